//! This process's compute class ([`verify::ComputeClass`]), the portable deterministic
//! settings, and the environment that makes this machine compute as another class does.
//!
//! Which settings decide the bits was measured with `experiments classes` (the README's
//! "Verification across hardware"): libtorch's dispatch capability (`ATEN_CPU_CAPABILITY`)
//! changes every model's results, MKL's code path (`MKL_CBWR`) the matrix products,
//! oneDNN's instruction set (`ONEDNN_MAX_CPU_ISA`) the convolutions, and the thread count
//! the reductions. Each of these libraries reads its variable once, when it starts, so the
//! settings must be in the environment before the first tensor operation.

use tch::Device;
use verify::ComputeClass;

/// The portable deterministic settings: libtorch's baseline kernels, MKL's conditional
/// numerical reproducibility path `COMPATIBLE` (the same results on Intel and AMD CPUs at a
/// fixed thread count, per Intel's MKL developer reference, "Obtaining Numerically
/// Reproducible Results"), oneDNN limited to SSE4.1 (both spellings of its variable).
pub const PORTABLE_ENV: [(&str, &str); 4] = [
    ("ATEN_CPU_CAPABILITY", "default"),
    ("MKL_CBWR", "COMPATIBLE"),
    ("ONEDNN_MAX_CPU_ISA", "SSE41"),
    ("DNNL_MAX_CPU_ISA", "SSE41"),
];

/// Whether this process was started with the portable settings in its environment (spelt
/// exactly so: libtorch compares `ATEN_CPU_CAPABILITY` case-sensitively).
pub fn portable_env_applied() -> bool {
    PORTABLE_ENV
        .iter()
        .all(|(k, v)| std::env::var(k).is_ok_and(|x| x == *v))
}

/// The highest capability libtorch's dispatcher can use on this CPU (`AVX512` when it has
/// AVX-512 F, BW, VL and DQ, `AVX2` with AVX2 and FMA, else `DEFAULT`), as
/// `compute_cpu_capability` in `ATen/native/DispatchStub.cpp` decides without a setting.
pub fn native_capability() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            return "AVX512";
        }
        if has!("avx2") && has!("fma") {
            return "AVX2";
        }
    }
    "DEFAULT"
}

fn rank(cap: &str) -> u8 {
    verify::class::capability_rank(cap).unwrap_or(0)
}

/// `MKL_CBWR` values this machine can set to reproduce another class's MKL path.
const MKL_PATHS: [&str; 7] = [
    "auto",
    "COMPATIBLE",
    "SSE2",
    "SSE4_2",
    "AVX",
    "AVX2",
    "AVX512",
];
/// `ONEDNN_MAX_CPU_ISA` values likewise.
const ONEDNN_ISAS: [&str; 9] = [
    "auto",
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_AMX",
];

/// The capability libtorch dispatches to in this process: `ATEN_CPU_CAPABILITY` when it is
/// exactly `default`, `avx2` or `avx512` (libtorch compares case-sensitively and ignores
/// anything else), else [`native_capability`].
pub fn dispatched_capability() -> String {
    match std::env::var("ATEN_CPU_CAPABILITY").as_deref() {
        Ok("default") => "DEFAULT".into(),
        Ok("avx2") => "AVX2".into(),
        Ok("avx512") => "AVX512".into(),
        _ => native_capability().into(),
    }
}

fn env_or_auto(names: &[&str]) -> String {
    names
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .map_or_else(|| "auto".into(), |v| v.to_ascii_uppercase())
}

fn cpu_vendor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("vendor_id"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The version of the libtorch this process loaded: `version.py` of a pip-installed torch
/// or `build-version` of a libtorch archive, next to the `lib` folder that holds
/// `libtorch_cpu.so` (found in `/proc/self/maps`); `unknown` when neither is there.
pub fn torch_version() -> String {
    let lib = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| p.ends_with("/libtorch_cpu.so"))
                .map(std::path::PathBuf::from)
        });
    let Some(root) = lib.as_deref().and_then(|p| p.parent()?.parent()) else {
        return "unknown".into();
    };
    if let Ok(s) = std::fs::read_to_string(root.join("version.py")) {
        if let Some(v) = s.lines().find_map(|l| {
            l.strip_prefix("__version__")
                .and_then(|r| r.split(['\'', '"']).nth(1))
        }) {
            return v.to_string();
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The GPU's model name from the NVIDIA driver (`/proc/driver/nvidia/gpus/*/information`),
/// `unknown` when it cannot be read.
fn gpu_model(index: usize) -> String {
    let mut dirs: Vec<_> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    dirs.get(index)
        .and_then(|d| std::fs::read_to_string(d.join("information")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The class this process computes in on `device` with `threads` intra-op threads.
pub fn detect(device: Device, threads: u32) -> ComputeClass {
    let device = match device {
        Device::Cuda(i) => format!("cuda:{}", gpu_model(i)),
        _ => "cpu".into(),
    };
    ComputeClass {
        device,
        arch: std::env::consts::ARCH.into(),
        torch: torch_version(),
        cpu_vendor: cpu_vendor(),
        cpu_capability: dispatched_capability(),
        cpu_isa: native_capability().into(),
        mkl_cbwr: env_or_auto(&["MKL_CBWR"]),
        onednn_isa: env_or_auto(&["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"]),
        threads,
        portable: portable_env_applied(),
    }
    .bounded()
}

/// The environment under which this machine (class `own`) computes the bits of class
/// `other`, or `None` when it cannot do so faithfully: only a CPU class of the same
/// architecture, libtorch, CPU vendor and instruction set (a machine of the same kind run
/// with other settings, or any portable class) can be emulated; MKL's and oneDNN's
/// automatic choices depend on the hardware, which no setting reproduces elsewhere.
/// Threads are not part of the environment: the caller sets them.
pub fn emulation_env(own: &ComputeClass, other: &ComputeClass) -> Option<Vec<(String, String)>> {
    if other.device != "cpu" || other.arch != own.arch || other.torch != own.torch {
        return None;
    }
    if other.portable {
        return Some(
            PORTABLE_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    if other.cpu_vendor != own.cpu_vendor
        || other.cpu_isa != own.cpu_isa
        || rank(&other.cpu_capability) > rank(&own.cpu_isa)
        || !MKL_PATHS.contains(&other.mkl_cbwr.as_str())
        || !ONEDNN_ISAS.contains(&other.onednn_isa.as_str())
    {
        return None;
    }
    let mut env = vec![(
        "ATEN_CPU_CAPABILITY".to_string(),
        other.cpu_capability.to_ascii_lowercase(),
    )];
    if other.mkl_cbwr != "auto" {
        env.push(("MKL_CBWR".into(), other.mkl_cbwr.clone()));
    }
    if other.onednn_isa != "auto" {
        env.push(("ONEDNN_MAX_CPU_ISA".into(), other.onednn_isa.clone()));
    }
    Some(env)
}

/// Variables [`emulation_env`] may set; a child that emulates a class starts without them.
pub const CLASS_ENV_VARS: [&str; 4] = [
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(cap: &str) -> ComputeClass {
        ComputeClass {
            device: "cpu".into(),
            arch: "x86_64".into(),
            torch: "2.11.0".into(),
            cpu_vendor: "AuthenticAMD".into(),
            cpu_capability: cap.into(),
            cpu_isa: "AVX2".into(),
            mkl_cbwr: "auto".into(),
            onednn_isa: "auto".into(),
            threads: 1,
            portable: false,
        }
    }

    #[test]
    fn emulates_only_what_this_machine_reproduces() {
        let own = cpu("AVX2");
        let env = emulation_env(&own, &cpu("DEFAULT")).expect("same machine, other setting");
        assert_eq!(env, vec![("ATEN_CPU_CAPABILITY".into(), "default".into())]);
        let intel = ComputeClass {
            cpu_vendor: "GenuineIntel".into(),
            ..cpu("DEFAULT")
        };
        assert!(emulation_env(&own, &intel).is_none());
        let bigger = ComputeClass {
            cpu_isa: "AVX512".into(),
            ..cpu("AVX512")
        };
        assert!(emulation_env(&own, &bigger).is_none());
        let gpu = ComputeClass {
            device: "cuda:NVIDIA H200".into(),
            ..cpu("AVX2")
        };
        assert!(emulation_env(&own, &gpu).is_none());
        let portable = ComputeClass {
            portable: true,
            ..intel
        };
        assert_eq!(emulation_env(&own, &portable).map(|e| e.len()), Some(4));
    }

    #[test]
    fn this_process_declares_a_class() {
        let c = detect(Device::Cpu, 1);
        assert_eq!(c.device, "cpu");
        assert!(rank(&c.cpu_capability) <= rank(&c.cpu_isa));
        assert_ne!(c.torch, "", "{c:?}");
    }
}
