//! Process settings shared by the binaries: logging, libtorch thread counts, the CUDA device.

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (default `info`), with colours
/// only on a terminal.
pub fn init_logging() {
    init_logging_to(std::io::stderr, "info");
}

/// Logs to `writer` at the levels of `RUST_LOG`, else at `default` (`"info"`, `"warn"`);
/// colours when stderr is a terminal.
pub fn init_logging_to<W>(writer: W, default: &str)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A byte count for the status lines: `12.3 MB` style (powers of 1000).
pub fn human_bytes(b: u64) -> String {
    let f = b as f64;
    match f {
        f if f >= 1e9 => format!("{:.2} GB", f / 1e9),
        f if f >= 1e6 => format!("{:.1} MB", f / 1e6),
        f if f >= 1e3 => format!("{:.1} kB", f / 1e3),
        _ => format!("{b} B"),
    }
}

use tch::Device;

/// Sets libtorch's intra-op thread count (`None` keeps libtorch's default).
pub fn set_threads(threads: Option<usize>) {
    if let Some(t) = threads {
        tch::set_num_threads(t.max(1) as i32);
    }
}

/// Loads `libtorch_cuda.so` into the process (the linker drops it because nothing refers to
/// it by symbol), so that libtorch registers its CUDA backend. Returns whether it loaded.
fn load_cuda_backend() -> bool {
    let name = c"libtorch_cuda.so";
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally kept
    // open for the life of the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

/// The device to compute on: CUDA when `allow_cuda` and a GPU is usable, else the CPU.
pub fn pick_device(allow_cuda: bool) -> Device {
    if allow_cuda && load_cuda_backend() && tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

/// A short name for a device, as reported to the coordinator.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
