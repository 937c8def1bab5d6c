//! `module.*` requests: resolve and list through the orchestrator's resolver chain.

use super::super::Orchestrator;
use rhizos_broker::wire::{self, ErrorCode, ListModules, ResolveModule, WireError};

impl Orchestrator {
    pub(in crate::orchestrator) async fn resolve_module(
        &self,
        uri: &str,
    ) -> Result<wire::ResolvedModule, WireError> {
        match &self.inner.modules {
            Some(modules) => modules.resolve(uri).await,
            None => Err(WireError::new(
                ErrorCode::NotFound,
                format!(
                    "cannot resolve {uri}: this orchestrator has no module resolvers ([orchestrator] resolver_dir)"
                ),
            )),
        }
    }

    pub(in crate::orchestrator) async fn module_list(
        &self,
        _request: ListModules,
    ) -> Result<wire::ModuleList, WireError> {
        match &self.inner.modules {
            Some(modules) => Ok(modules.list().await),
            None => Ok(wire::ModuleList {
                modules: Vec::new(),
                unlisted: Vec::new(),
                problems: vec![
                    "this orchestrator has no module resolvers ([orchestrator] resolver_dir)"
                        .into(),
                ],
            }),
        }
    }

    pub(in crate::orchestrator) async fn module_resolve(
        &self,
        request: ResolveModule,
    ) -> Result<wire::ResolvedModule, WireError> {
        self.resolve_module(&request.uri).await
    }
}
