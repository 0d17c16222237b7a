use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// An object in /dev/shm removed when dropped.
struct Object {
    name: String,
    path: PathBuf,
}

impl Object {
    fn new(bytes: &[u8]) -> Object {
        let name = format!(
            "normserve-unit-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let path = PathBuf::from("/dev/shm").join(&name);
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.write_all(bytes).unwrap();
        Object { name, path }
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn limits() -> ShmLimits {
    ShmLimits {
        enabled: true,
        dir: PathBuf::from("/dev/shm"),
        max_bytes: 1 << 30,
        tenant_max_regions: 4,
        tenant_max_bytes: 1 << 20,
        idle: None,
    }
}

fn range(region: &str, offset: u64, byte_size: u64) -> RangeRequest {
    RangeRequest {
        region: region.to_owned(),
        offset,
        byte_size,
    }
}

#[test]
fn names_are_object_names_only() {
    for bad in ["", ".", "..", "a/b", "/abs", "nul\0", &"x".repeat(256)] {
        assert!(
            matches!(check_name(bad), Err(ShmError::InvalidArgument(_))),
            "{bad:?} accepted"
        );
    }
    for good in ["a", "normserve-1234", &"x".repeat(255), "...", "a.b"] {
        check_name(good).unwrap();
    }
}

#[test]
fn ranges_must_lie_within_the_region_and_be_aligned() {
    let object = Object::new(&[7u8; 4096 + 64]);
    let shm = SharedMemory::new(limits());
    // The region starts 16 bytes into the object and covers 64 bytes.
    shm.register("t", &object.name, 16, 64).unwrap();
    let whole = shm
        .range("t", "input", &range(&object.name, 0, 64), 8)
        .unwrap();
    assert_eq!(whole.bytes().as_ref(), &[7u8; 64]);
    for (offset, size) in [(0, 65), (60, 8), (64, 1), (u64::MAX, 2)] {
        let err = shm
            .range("t", "input", &range(&object.name, offset, size), 1)
            .unwrap_err();
        assert!(
            matches!(err, ShmError::OutOfRange(_)),
            "{offset},{size}: {err}"
        );
    }
    // 16 + 4 is not a multiple of 8 (float64), but is of 4 (float32).
    let err = shm
        .range("t", "input", &range(&object.name, 4, 8), 8)
        .unwrap_err();
    assert!(matches!(err, ShmError::InvalidArgument(_)), "{err}");
    shm.range("t", "input", &range(&object.name, 4, 8), 4)
        .unwrap();
}

#[test]
fn another_tenants_region_is_not_found() {
    let object = Object::new(&[0u8; 128]);
    let shm = SharedMemory::new(limits());
    shm.register("a", &object.name, 0, 128).unwrap();
    let err = shm
        .range("b", "input", &range(&object.name, 0, 8), 4)
        .unwrap_err();
    assert!(matches!(err, ShmError::NotFound(_)), "{err}");
    let never = shm
        .range("b", "input", &range("never-registered", 0, 8), 4)
        .unwrap_err();
    assert_eq!(
        err.to_string().replace(&object.name, "X"),
        never.to_string().replace("never-registered", "X")
    );
    assert!(matches!(
        shm.unregister("b", Some(&object.name)),
        Err(ShmError::NotFound(_))
    ));
    assert_eq!(shm.status("b", None).unwrap(), vec![]);
    assert_eq!(shm.unregister("a", None).unwrap(), 1);
}

#[test]
fn an_unlinked_object_unregisters_its_region() {
    let object = Object::new(&[0u8; 128]);
    let shm = SharedMemory::new(limits());
    shm.register("t", &object.name, 0, 128).unwrap();
    std::fs::remove_file(&object.path).unwrap();
    let err = shm
        .range("t", "input", &range(&object.name, 0, 8), 4)
        .unwrap_err();
    assert!(matches!(err, ShmError::Unlinked(_)), "{err}");
    assert_eq!(shm.totals(), (0, 0));
    let err = shm
        .range("t", "input", &range(&object.name, 0, 8), 4)
        .unwrap_err();
    assert!(matches!(err, ShmError::NotFound(_)), "{err}");
}

#[test]
fn a_truncated_object_is_found_before_use() {
    let object = Object::new(&[0u8; 8192]);
    let shm = SharedMemory::new(limits());
    shm.register("t", &object.name, 0, 8192).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&object.path)
        .unwrap()
        .set_len(100)
        .unwrap();
    let err = shm
        .range("t", "input", &range(&object.name, 0, 8), 4)
        .unwrap_err();
    assert!(matches!(err, ShmError::Truncated(_)), "{err}");
    assert_eq!(shm.totals(), (0, 0));
}

#[test]
fn a_truncation_during_use_reads_zeros_instead_of_killing_the_process() {
    let page = 4096;
    let object = Object::new(&vec![0xAB; 4 * page]);
    let shm = SharedMemory::new(limits());
    shm.register("t", &object.name, 0, 4 * page as u64).unwrap();
    let input = shm
        .range("t", "input", &range(&object.name, 0, 4 * page as u64), 4)
        .unwrap();
    let bytes = input.bytes();
    assert_eq!(bytes[3 * page], 0xAB);
    // The owner shrinks its object while the server holds a view of it: the
    // pages past the end would raise SIGBUS.
    OpenOptions::new()
        .write(true)
        .open(&object.path)
        .unwrap()
        .set_len(page as u64)
        .unwrap();
    let tail: u64 = bytes[2 * page..].iter().map(|&b| u64::from(b)).sum();
    assert_eq!(tail, 0, "the lost pages read as zeros");
    assert_eq!(bytes[0], 0xAB, "the pages still backed are the object's");
    assert!(input.region().faulted());
    let err = input.write(&vec![1u8; 4 * page]).unwrap_err();
    assert!(matches!(err, ShmError::Truncated(_)), "{err}");
    shm.forget_broken("t", &input);
    assert_eq!(shm.totals(), (0, 0));
}

#[test]
fn writes_land_in_the_object() {
    let object = Object::new(&[0u8; 64]);
    let shm = SharedMemory::new(limits());
    shm.register("t", &object.name, 0, 64).unwrap();
    let output = shm
        .range("t", "output", &range(&object.name, 8, 16), 4)
        .unwrap();
    output.write(&[5u8; 16]).unwrap();
    let content = std::fs::read(&object.path).unwrap();
    assert_eq!(&content[..8], &[0u8; 8]);
    assert_eq!(&content[8..24], &[5u8; 16]);
    assert_eq!(&content[24..], &[0u8; 40]);
}

#[test]
fn registration_is_bounded_per_tenant_and_server_wide() {
    let objects: Vec<Object> = (0..6).map(|_| Object::new(&[0u8; 1024])).collect();
    let shm = SharedMemory::new(ShmLimits {
        max_bytes: 5 * 1024,
        ..limits()
    });
    for object in &objects[..4] {
        shm.register("a", &object.name, 0, 1024).unwrap();
    }
    let err = shm.register("a", &objects[4].name, 0, 1024).unwrap_err();
    assert!(
        err.to_string()
            .contains("--tenant-shared-memory-max-regions"),
        "{err}"
    );
    shm.register("b", &objects[4].name, 0, 1024).unwrap();
    let err = shm.register("b", &objects[5].name, 0, 1024).unwrap_err();
    assert!(
        err.to_string().contains("--shared-memory-max-bytes"),
        "{err}"
    );
    assert_eq!(shm.totals(), (5 * 1024, 5));
    // The same registration again is a no-op; a different one is refused.
    assert!(shm.register("a", &objects[0].name, 0, 1024).unwrap().1);
    let err = shm.register("a", &objects[0].name, 0, 512).unwrap_err();
    assert!(matches!(err, ShmError::AlreadyExists(_)), "{err}");
}

#[test]
fn registration_refuses_links_and_missing_objects() {
    let object = Object::new(&[0u8; 64]);
    let link = format!("{}-link", object.name);
    let link_path = PathBuf::from("/dev/shm").join(&link);
    std::os::unix::fs::symlink(&object.path, &link_path).unwrap();
    let shm = SharedMemory::new(limits());
    let err = shm.register("t", &link, 0, 64).unwrap_err();
    let _ = std::fs::remove_file(&link_path);
    assert!(matches!(err, ShmError::NotShared(_)), "{err}");
    let err = shm
        .register("t", "normserve-unit-no-such-object", 0, 64)
        .unwrap_err();
    assert!(matches!(err, ShmError::NoObject(_)), "{err}");
    let err = shm.register("t", &object.name, 32, 64).unwrap_err();
    assert!(matches!(err, ShmError::NotShared(_)), "{err}");
}

#[test]
fn idle_regions_expire() {
    let object = Object::new(&[0u8; 64]);
    let shm = SharedMemory::new(ShmLimits {
        idle: Some(Duration::from_millis(200)),
        ..limits()
    });
    shm.register("t", &object.name, 0, 64).unwrap();
    assert_eq!(shm.expire_idle(), 0);
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(shm.expire_idle(), 1);
    assert_eq!(shm.totals(), (0, 0));
}

#[test]
fn off_refuses_everything() {
    let shm = SharedMemory::new(ShmLimits {
        enabled: false,
        ..limits()
    });
    assert!(matches!(
        shm.register("t", "x", 0, 1),
        Err(ShmError::Unavailable(_))
    ));
}

/// A Forward's output computed straight into a range (libtorch's kernel for
/// (N, C), the native one for (N, C, L)) while the owner has truncated the
/// object: the writes land on the guard's zero pages, wherever they come
/// from, the process lives on, and the range reports the loss.
#[test]
fn a_truncation_while_an_output_is_computed_into_its_range_is_caught() {
    use crate::numerics::batch_norm::Layer;
    use crate::numerics::stats::StatsKernel;
    use crate::numerics::{output_tensor, DType, ExternalMemory, LayerKind};
    use tch::{Device, Kind, Tensor};

    let page = 4096;
    let cases: [(&[i64], StatsKernel); 2] = [
        (&[1024, 4], StatsKernel::Libtorch),
        (&[64, 4, 16], StatsKernel::Native),
    ];
    for (shape, stats) in cases {
        let object = Object::new(&vec![0u8; 4 * page]);
        let shm = SharedMemory::new(limits());
        shm.register("t", &object.name, 0, 4 * page as u64).unwrap();
        let output = shm
            .range("t", "output", &range(&object.name, 0, 4 * page as u64), 4)
            .unwrap();
        assert!(output.check_intact().is_ok());
        let options = (Kind::Float, Device::Cpu);
        let params = [
            Tensor::ones([4], options),
            Tensor::zeros([4], options),
            Tensor::zeros([4], options),
            Tensor::ones([4], options),
        ];
        let layer = Layer {
            kind: LayerKind::BatchNorm1d,
            num_features: 4,
            eps: 1e-5,
            param_dtype: DType::Float32,
            weight: Some(&params[0]),
            bias: Some(&params[1]),
            running_mean: Some(&params[2]),
            running_var: Some(&params[3]),
            stats,
        };
        let input = Tensor::randn(shape, options);
        let out = output_tensor(Arc::new(output.clone()), DType::Float32, shape).unwrap();
        // Past the first page the object is gone: every write there faults.
        OpenOptions::new()
            .write(true)
            .open(&object.path)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        layer.forward_train_into(&input, 0.1, &out).unwrap();
        drop(out);
        let lost = output.check_intact().unwrap_err();
        assert!(lost.contains("truncated"), "{lost}");
        assert!(output.region().faulted(), "{stats:?}");
        shm.forget_broken("t", &output);
        assert_eq!(shm.totals(), (0, 0));
    }
}

#[test]
fn cuda_ipc_handles_of_the_wrong_length_are_refused_before_any_cuda_call() {
    let shared = SharedMemory::new(limits());
    for length in [0, 63, 65] {
        let error = shared
            .register_cuda("t", "gpu", &vec![1u8; length], 0, 0, 64)
            .unwrap_err();
        assert!(
            matches!(&error, ShmError::InvalidArgument(text) if text.contains("64 bytes") && text.contains(&format!("got {length}"))),
            "{error}"
        );
    }
    assert_eq!(shared.totals(), (0, 0));
}

#[test]
fn cuda_ipc_regions_need_a_cuda_device() {
    if tch::Cuda::device_count() > 0 {
        println!("skipped: this machine has CUDA");
        return;
    }
    let shared = SharedMemory::new(limits());
    let error = shared
        .register_cuda("t", "gpu", &[7u8; CUDA_IPC_HANDLE_BYTES], 0, 0, 64)
        .unwrap_err();
    assert!(
        matches!(&error, ShmError::Unavailable(text) if text == "this server has no CUDA device"),
        "{error}"
    );
    assert!(shared.status("t", None).unwrap().is_empty());
}

#[test]
fn a_cuda_ipc_name_is_checked_like_any_region_name() {
    let shared = SharedMemory::new(limits());
    let error = shared
        .register_cuda("t", "a/b", &[7u8; CUDA_IPC_HANDLE_BYTES], 0, 0, 64)
        .unwrap_err();
    assert!(matches!(error, ShmError::InvalidArgument(_)), "{error}");
}
