//! A Substrate node's storage value, decoded as the substrate resolver decodes it (hex, then
//! SCALE `Vec<ModuleVersion>`): a lying chain endpoint must get an error, never a panic or an
//! allocation sized by a forged length prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parity_scale_codec::Decode;
use rhizos_plugin_resolver_substrate::{ModuleVersion, from_hex};

fuzz_target!(|data: &[u8]| {
    let _ = Vec::<ModuleVersion>::decode(&mut &data[..]);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(bytes) = from_hex(text)
    {
        let _ = Vec::<ModuleVersion>::decode(&mut bytes.as_slice());
    }
});
