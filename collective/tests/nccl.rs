//! NCCL and the CUDA runtime are bound from the copies libtorch loaded: in a process without
//! libtorch_cuda (this test's), every entry point says what is missing instead of loading a
//! copy of its own or panicking. The binding itself is tested where libtorch is linked
//! (`worker/tests/libraries.rs`); `scripts/gpu-check` exercises the real thing on a GPU.

use ladder_collective::nccl::{self, NcclCommunicator, UNIQUE_ID_BYTES};
use ladder_collective::{Collective, CollectiveError, libraries};
use std::time::Duration;

#[test]
fn without_libtorchs_nccl_every_entry_point_says_what_is_missing() {
    assert!(libraries::mapped("libnccl.so").is_empty());
    let missing = nccl::versions().unwrap_err().to_string();
    assert!(
        missing.contains("no NCCL is loaded in this process"),
        "{missing}"
    );
    assert!(missing.contains("libtorch_cuda"), "{missing}");
    let id = nccl::unique_id().unwrap_err();
    assert!(matches!(id, CollectiveError::Unsupported(_)), "{id}");
    let join = NcclCommunicator::init(0, 1, &[0; UNIQUE_ID_BYTES], 0, Duration::from_secs(1))
        .err()
        .expect("no communicator without NCCL");
    assert!(join.to_string().contains("no NCCL"), "{join}");
    assert!(
        libraries::mapped("libnccl.so").is_empty(),
        "nothing was loaded"
    );
}

#[test]
fn the_ring_refuses_device_memory_with_a_reason() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let mut ring = ladder_collective::ring::TcpRing::connect(
        0,
        listener,
        &[address],
        1,
        b"key",
        Duration::from_secs(5),
    )
    .unwrap();
    // SAFETY: the ring refuses before touching the address.
    let refused = unsafe { ring.all_reduce_sum_device(0, 16) }.unwrap_err();
    assert!(refused.to_string().contains("host memory"), "{refused}");
}
