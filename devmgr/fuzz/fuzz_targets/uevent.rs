//! Fuzzes the sysfs `uevent` parser: it must never panic, validated values
//! must hold their invariants, and a parsed file must survive a round trip.
#![no_main]

use std::path::Component;

use capsule_devmgr::uevent::Uevent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(u) = Uevent::parse(data) else {
        return;
    };
    let _ = (u.major(), u.minor(), u.devtype(), u.get("DEVNAME"), u.len());
    if let Ok(Some(name)) = u.devname() {
        assert!(!name.as_os_str().is_empty());
        assert!(name.components().all(|c| matches!(c, Component::Normal(_))));
    }
    // Re-serialising the entries gives a file that parses to the same thing.
    let mut text = Vec::new();
    for (key, value) in u.iter() {
        text.extend_from_slice(key.as_bytes());
        text.push(b'=');
        text.extend_from_slice(value);
        text.push(b'\n');
    }
    assert_eq!(Uevent::parse(&text).expect("round trip"), u);
});
