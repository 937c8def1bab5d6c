//! Component-plugin manifests (`x.json` beside `x.wasm` in the plugin directory), parsed and
//! checked as the agent and the orchestrator parse them before loading a component.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let base = std::env::temp_dir();
        if let Ok(manifest) = rhizos_plugin_api::manifest::parse_manifest(text, &base) {
            assert!(manifest.memory_mib > 0 && manifest.memory_mib <= 1024);
            assert!(manifest.read_dirs.iter().all(|g| g.guest.starts_with('/') && g.host.is_dir()));
        }
    }
});
