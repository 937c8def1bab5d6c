//! Everything a peer can send the orchestrator or an agent, decoded as they decode it: no input
//! may panic, hang or allocate without bound. Decoded reports are also signature-checked and
//! re-encoded, the way the orchestrator handles them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhizos_broker::wire::{self, *};

const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode::<SubmitJob>(data, MAX);
    let _ = wire::decode::<CancelJob>(data, MAX);
    let _ = wire::decode::<ListJobs>(data, MAX);
    let _ = wire::decode::<Deposit>(data, MAX);
    let _ = wire::decode::<Withdraw>(data, MAX);
    let _ = wire::decode::<EnrollNode>(data, MAX);
    let _ = wire::decode::<GetReceipt>(data, MAX);
    let _ = wire::decode::<ResolveModule>(data, MAX);
    let _ = wire::decode::<Heartbeat>(data, MAX);
    let _ = wire::decode::<AssignJob>(data, MAX);
    let _ = wire::decode::<StopJob>(data, MAX);
    let _ = wire::decode::<RegisterAgain>(data, MAX);
    let _ = wire::decode::<LogBatch>(data, MAX);
    let _ = wire::decode::<Reply<Ack>>(data, MAX);
    if let Ok(registration) = wire::decode::<RegisterNode>(data, MAX) {
        let _ = wire::encode(&registration);
    }
    if let Ok(report) = wire::decode::<JobReport>(data, MAX) {
        let _ = report.verify_signature();
        let _ = report.signed_bytes();
    }
    if let Ok(receipt) = wire::decode::<SignedReceipt>(data, MAX) {
        if let Ok(body) = receipt.verify(None) {
            let _ = body.check();
            let _ = body.check_node_report();
        }
    }
});
