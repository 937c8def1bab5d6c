//! The orchestrator's request API: every `ctl` request is decoded as the message its operation
//! takes and answered with the reply that operation promises ([`rhizos_broker::Request`]). The
//! dispatch is an exhaustive `match` on [`CtlOp`], so a new operation does not compile until it
//! is handled here; a subject that names no operation gets `unsupported_subject`.
//!
//! One file per noun: [`jobs`], [`accounts`] (with `ledger.verify`), [`keys`], [`nodes`],
//! [`modules`], [`receipts`].

mod accounts;
mod ai;
mod flows;
mod jobs;
mod keys;
mod modules;
mod nodes;
mod receipts;

use super::Orchestrator;
use rhizos_broker::wire::{self, ErrorCode, Reply, WireError};
use rhizos_broker::{Caller, CtlOp, Request, Role};
use serde::Serialize;

impl Orchestrator {
    /// Answers a request the orchestrator has no room for with `too_busy` (retryable).
    pub(super) async fn too_busy(&self, message: async_nats::Message) {
        tracing::warn!(subject = %message.subject, "too many requests in flight; answered too_busy");
        if let Some(reply_to) = message.reply {
            let reply = encode_reply::<()>(Err(WireError::new(
                ErrorCode::TooBusy,
                format!(
                    "the orchestrator is serving {} requests; retry in a moment",
                    self.inner.settings.max_requests_in_flight
                ),
            )));
            let _ = self.inner.bus.client.publish(reply_to, reply).await;
        }
    }

    pub(super) async fn handle_request(&self, message: async_nats::Message) {
        let Some(reply_to) = message.reply.clone() else {
            tracing::debug!(subject = %message.subject, "request without reply subject ignored");
            return;
        };
        let call = self.inner.bus.subjects.orchestrator_call(&message.subject);
        let reply = match &call {
            Some(Ok((caller, op))) if op.allows(caller.role) => {
                self.serve_op(*op, caller, &message.payload).await
            }
            Some(Ok((caller, op))) => {
                tracing::warn!(%caller, operation = %op, "operation refused: not this role's");
                encode_reply::<()>(Err(forbidden(format!(
                    "{caller} may not call {op} (allowed: {})",
                    op.callers()
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))))
            }
            Some(Err(_)) | None => unsupported(&message.subject),
        };
        if let Err(e) = self.inner.bus.client.publish(reply_to, reply).await {
            tracing::warn!(error = %e, subject = %message.subject, "failed to send reply");
        }
    }

    /// Serves `op` for `caller` (whose role may call it). Each handler checks the rest: that
    /// what the payload names (an account, a job, a node) is the caller's own.
    async fn serve_op(&self, op: CtlOp, caller: &Caller, payload: &[u8]) -> bytes::Bytes {
        let c = caller.clone();
        match op {
            CtlOp::JobSubmit => self.serve(payload, |r| self.submit(c, r)).await,
            CtlOp::JobGet => self.serve(payload, |r| self.get_job(c, r)).await,
            CtlOp::JobList => self.serve(payload, |r| self.list_jobs(c, r)).await,
            CtlOp::JobCancel => self.serve(payload, |r| self.cancel_job(c, r)).await,
            CtlOp::JobReport => self.serve(payload, |r| self.report(c, r)).await,
            CtlOp::AccountCreate => self.serve(payload, |r| self.account_create(r)).await,
            CtlOp::AccountDeposit => self.serve(payload, |r| self.account_deposit(r)).await,
            CtlOp::AccountWithdraw => self.serve(payload, |r| self.account_withdraw(r)).await,
            CtlOp::AccountBalance => self.serve(payload, |r| self.account_balance(c, r)).await,
            CtlOp::AccountStatement => self.serve(payload, |r| self.account_statement(c, r)).await,
            CtlOp::KeyCreate => self.serve(payload, |r| self.key_create(c, r)).await,
            CtlOp::KeyList => self.serve(payload, |r| self.key_list(c, r)).await,
            CtlOp::KeyRevoke => self.serve(payload, |r| self.key_revoke(c, r)).await,
            CtlOp::KeyAuthenticate => self.serve(payload, |r| self.key_authenticate(c, r)).await,
            CtlOp::ModelList => self.serve(payload, |r| self.model_list(r)).await,
            CtlOp::JobWitness => self.serve(payload, |r| self.job_witness(r)).await,
            CtlOp::NodeRegister => self.serve(payload, |r| self.register_node(c, r)).await,
            CtlOp::NodeList => self.serve(payload, |r| self.node_list(r)).await,
            CtlOp::NodeInfo => self.serve(payload, |r| self.node_info(r)).await,
            CtlOp::NodeEnroll => self.serve(payload, |r| self.node_enroll(r)).await,
            CtlOp::NodeRemove => self.serve(payload, |r| self.node_remove(r)).await,
            CtlOp::LedgerVerify => self.serve(payload, |r| self.ledger_verify(r)).await,
            CtlOp::NetworkStats => self.serve(payload, |r| self.network_stats(c, r)).await,
            CtlOp::ModuleResolve => self.serve(payload, |r| self.module_resolve(r)).await,
            CtlOp::ModuleList => self.serve(payload, |r| self.module_list(r)).await,
            CtlOp::FlowEstimate => self.serve(payload, |r| self.flow_estimate(r)).await,
            CtlOp::FlowRun => self.serve(payload, |r| self.flow_run(c, r)).await,
            CtlOp::FlowGet => self.serve(payload, |r| self.flow_get(c, r)).await,
            CtlOp::FlowList => self.serve(payload, |r| self.flow_list(c, r)).await,
            CtlOp::FlowCancel => self.serve(payload, |r| self.flow_cancel(c, r)).await,
            CtlOp::ReceiptGet => self.serve(payload, |r| self.receipt_get(c, r)).await,
            // Served by each node's agent on its own subject; never subscribed to here.
            CtlOp::JobAssign | CtlOp::JobStop | CtlOp::NodePlugins | CtlOp::NodeReregister => {
                unsupported(&format!("{op} (it is served by each node's agent)"))
            }
        }
    }

    /// Decodes the request `R` (size → version → shape), runs `handler`, and encodes the reply
    /// type of `R`'s operation.
    async fn serve<R: Request, F>(
        &self,
        payload: &[u8],
        handler: impl FnOnce(R) -> F,
    ) -> bytes::Bytes
    where
        F: Future<Output = Result<R::Reply, WireError>>,
    {
        let started = std::time::Instant::now();
        let result = match self.decode::<R>(payload) {
            Ok(request) => handler(request).await,
            Err(e) => Err(e),
        };
        let metrics = &self.inner.metrics;
        let op = R::OP.as_str();
        metrics
            .requests
            .with_label_values(&[
                op,
                result.as_ref().map_or_else(|e| e.code.as_str(), |_| "ok"),
            ])
            .inc();
        metrics
            .request_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        encode_reply(result)
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, payload: &[u8]) -> Result<T, WireError> {
        wire::decode(payload, self.inner.settings.max_request_bytes)
    }
}

/// The caller may not do this, or the object is another party's.
pub(in crate::orchestrator) fn forbidden(message: String) -> WireError {
    WireError::new(ErrorCode::Forbidden, message)
}

/// Whether `caller` may act for `account`: a user for its own, the operator for any.
pub(in crate::orchestrator) fn acts_for(caller: &Caller, account: &str) -> bool {
    caller.role == Role::Operator || (caller.role == Role::User && caller.name == account)
}

/// A user may act only for its own account; the operator for any.
pub(in crate::orchestrator) fn own_account(
    caller: &Caller,
    account: &str,
) -> Result<(), WireError> {
    if acts_for(caller, account) {
        Ok(())
    } else {
        Err(forbidden(format!(
            "{caller} may not act for account {account}: a user acts only for its own account"
        )))
    }
}

fn unsupported(subject: &str) -> bytes::Bytes {
    encode_reply::<()>(Err(WireError::new(
        ErrorCode::UnsupportedSubject,
        format!(
            "unsupported subject {subject}: the orchestrator serves the rhizos.ctl.v1.<ns>.<role>.<name>.<noun>.<verb> subjects in the README's table"
        ),
    )))
}

fn encode_reply<T: Serialize>(result: Result<T, WireError>) -> bytes::Bytes {
    match result {
        Ok(data) => wire::encode(&Reply::ok(data)),
        Err(error) => wire::encode(&Reply::<T>::err(error)),
    }
}
