//! Module manifests (what a resolver returns for `chain://<id>`) and module references, parsed
//! as the orchestrator parses them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhizos_broker::wire::{ModuleManifest, ModuleRef};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ModuleRef::parse(text);
        if let Ok(manifest) = serde_json::from_str::<ModuleManifest>(text) {
            let _ = serde_json::to_string(&manifest);
        }
    }
});
