//! Arbitrary bytes as a device state file: decoding never panics, and a
//! state that decodes re-encodes to bytes that decode to the same state and
//! load into a manager.
#![no_main]

use std::sync::Arc;

use capsule_devmgr::device::BlockDriver;
use capsule_devmgr::manager::{DeviceManager, ManagerConfig};
use capsule_devmgr::state::{decode, encode, SandboxState, StateError, StateStore};
use capsule_devmgr::testing::RecordingBackend;
use libfuzzer_sys::fuzz_target;

/// A store holding `bytes`, never written.
struct Bytes(Vec<u8>);

impl StateStore for Bytes {
    fn location(&self) -> String {
        "fuzz input".into()
    }
    fn load(&mut self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(Some(self.0.clone()))
    }
    fn save(&mut self, _: &SandboxState) -> Result<(), StateError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut config = ManagerConfig::new(BlockDriver::VirtioScsi, 1..32);
    config.pmem_slots = 0..4;
    let Ok(state) = decode(data, &config) else {
        return;
    };
    let bytes = encode(&state).expect("a decoded state encodes");
    assert_eq!(
        decode(&bytes, &config).expect("re-encoded state decodes"),
        state
    );
    let mgr = DeviceManager::load(
        config,
        Arc::new(RecordingBackend::new()),
        Bytes(data.to_vec()),
    )
    .expect("a decoded state loads");
    assert_eq!(mgr.snapshot(), state);
});
