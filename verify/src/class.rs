//! Compute classes: what decides the exact bits a machine computes.
//!
//! Two honest machines give bitwise equal results only when they run the same kernels in the
//! same order: the same device, libtorch build, CPU kernels (libtorch's dispatch capability,
//! MKL's code path, oneDNN's instruction set) and thread count. A worker declares its class
//! in the handshake and binds its [`ComputeClass::digest`] into every commitment; the
//! coordinator compares bitwise only within a class, and across classes within a tolerance.
//!
//! In the portable mode every x86-64 CPU runs the same baseline kernels (libtorch's
//! `DEFAULT` capability, MKL's conditional numerical reproducibility `COMPATIBLE` path,
//! oneDNN limited to SSE4.1, fixed threads: the approach of Gensyn's RepOps, same bits on any
//! hardware), so vendor and instruction sets drop out of the digest.

use serde::{Deserialize, Serialize};

use crate::Hash;

/// Longest string kept in a field of a declared class (longer ones are cut).
pub const MAX_CLASS_FIELD: usize = 64;

/// What a worker computes on, as it declares it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ComputeClass {
    /// `cpu`, or `cuda:` and the GPU's model name.
    pub device: String,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// libtorch version (`2.11.0+cu130`), `unknown` when it cannot be read.
    pub torch: String,
    /// CPU vendor (`/proc/cpuinfo` `vendor_id`: `GenuineIntel`, `AuthenticAMD`, ...).
    pub cpu_vendor: String,
    /// The kernel capability libtorch dispatches to (`DEFAULT`, `AVX2`, `AVX512`), as
    /// `ATen/native/DispatchStub.cpp` picks it from `ATEN_CPU_CAPABILITY` and the CPU.
    pub cpu_capability: String,
    /// The highest capability the CPU itself supports (what libtorch would pick unset).
    pub cpu_isa: String,
    /// MKL's code path: the `MKL_CBWR` setting, or `auto` (MKL picks by CPU).
    pub mkl_cbwr: String,
    /// oneDNN's instruction-set limit: `ONEDNN_MAX_CPU_ISA`, or `auto`.
    pub onednn_isa: String,
    /// Intra-op compute threads.
    pub threads: u32,
    /// Whether the worker runs the portable deterministic settings.
    pub portable: bool,
}

/// The most threads a declared class may have.
pub const MAX_CLASS_THREADS: u32 = 1024;

/// The order of libtorch's x86 capabilities (`None` for others, e.g. another architecture's).
pub fn capability_rank(cap: &str) -> Option<u8> {
    match cap {
        "DEFAULT" => Some(0),
        "AVX2" => Some(1),
        "AVX512" => Some(2),
        _ => None,
    }
}

impl ComputeClass {
    /// Checks a declared class: printable ASCII without spaces in the settings, threads in
    /// 1..=[`MAX_CLASS_THREADS`], and on x86-64 a dispatched capability the CPU's own
    /// capability covers. Errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("device", &self.device),
            ("arch", &self.arch),
            ("torch", &self.torch),
            ("cpu_vendor", &self.cpu_vendor),
            ("cpu_capability", &self.cpu_capability),
            ("cpu_isa", &self.cpu_isa),
            ("mkl_cbwr", &self.mkl_cbwr),
            ("onednn_isa", &self.onednn_isa),
        ];
        for (name, v) in fields {
            if v.is_empty()
                || v.len() > MAX_CLASS_FIELD
                || v.chars().any(|c| !(' '..='~').contains(&c))
            {
                return Err(format!(
                    "{name} must be 1 to {MAX_CLASS_FIELD} printable ASCII characters"
                ));
            }
        }
        for (name, v) in [
            ("cpu_capability", &self.cpu_capability),
            ("cpu_isa", &self.cpu_isa),
            ("mkl_cbwr", &self.mkl_cbwr),
            ("onednn_isa", &self.onednn_isa),
        ] {
            if !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ',')
            {
                return Err(format!("{name} {v:?} is not a setting"));
            }
        }
        if !(1..=MAX_CLASS_THREADS).contains(&self.threads) {
            return Err(format!(
                "threads {} not in 1..={MAX_CLASS_THREADS}",
                self.threads
            ));
        }
        if self.arch == "x86_64" {
            match (
                capability_rank(&self.cpu_capability),
                capability_rank(&self.cpu_isa),
            ) {
                (Some(c), Some(i)) if c <= i => {}
                _ => {
                    return Err(format!(
                        "cpu_capability {} with cpu_isa {} is not a capability this CPU has",
                        self.cpu_capability, self.cpu_isa
                    ))
                }
            }
        }
        Ok(())
    }

    /// blake3 (context `"dtrain compute class v1"`) of the fields that decide the bits, each
    /// as a u32 LE length and its bytes: `device`, `arch`, `torch`, `threads` (u32 LE),
    /// `portable` (one byte); unless the class is portable on a CPU, also `cpu_vendor`,
    /// `cpu_capability`, `cpu_isa`, `mkl_cbwr`, `onednn_isa` (before `threads`). Two workers
    /// with equal digests are expected to compute equal bits (the checks still take other
    /// bits within their tolerance as no evidence: a class may hide other CPU models).
    pub fn digest(&self) -> Hash {
        let mut h = blake3::Hasher::new_derive_key("dtrain compute class v1");
        let mut field = |s: &str| {
            h.update(&(s.len() as u32).to_le_bytes());
            h.update(s.as_bytes());
        };
        field(&self.device);
        field(&self.arch);
        field(&self.torch);
        if !self.portable_cpu() {
            field(&self.cpu_vendor);
            field(&self.cpu_capability);
            field(&self.cpu_isa);
            field(&self.mkl_cbwr);
            field(&self.onednn_isa);
        }
        h.update(&self.threads.to_le_bytes());
        h.update(&[u8::from(self.portable)]);
        *h.finalize().as_bytes()
    }

    /// Whether this is a CPU running the portable settings.
    pub fn portable_cpu(&self) -> bool {
        self.portable && self.device == "cpu"
    }

    /// The class with every string cut to [`MAX_CLASS_FIELD`] bytes (on a character
    /// boundary), as the coordinator keeps a declared class.
    pub fn bounded(mut self) -> Self {
        for s in [
            &mut self.device,
            &mut self.arch,
            &mut self.torch,
            &mut self.cpu_vendor,
            &mut self.cpu_capability,
            &mut self.cpu_isa,
            &mut self.mkl_cbwr,
            &mut self.onednn_isa,
        ] {
            if s.len() > MAX_CLASS_FIELD {
                let mut end = MAX_CLASS_FIELD;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
            }
        }
        self
    }

    /// A short label for logs: `cpu/AVX2/AuthenticAMD/t1` or `cpu/portable/t1`.
    pub fn label(&self) -> String {
        if self.portable_cpu() {
            format!("{}/portable/t{}", self.device, self.threads)
        } else if self.device == "cpu" {
            format!(
                "cpu/{}/{}/t{}",
                self.cpu_capability, self.cpu_vendor, self.threads
            )
        } else {
            self.device.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(cap: &str, vendor: &str, portable: bool) -> ComputeClass {
        ComputeClass {
            device: "cpu".into(),
            arch: "x86_64".into(),
            torch: "2.11.0".into(),
            cpu_vendor: vendor.into(),
            cpu_capability: cap.into(),
            cpu_isa: "AVX512".into(),
            mkl_cbwr: "auto".into(),
            onednn_isa: "auto".into(),
            threads: 1,
            portable,
        }
    }

    #[test]
    fn kernels_split_classes_unless_portable() {
        assert_ne!(
            cpu("AVX2", "AuthenticAMD", false).digest(),
            cpu("DEFAULT", "AuthenticAMD", false).digest()
        );
        assert_ne!(
            cpu("AVX2", "AuthenticAMD", false).digest(),
            cpu("AVX2", "GenuineIntel", false).digest()
        );
        assert_eq!(
            cpu("AVX512", "GenuineIntel", true).digest(),
            cpu("DEFAULT", "AuthenticAMD", true).digest()
        );
        assert_ne!(
            cpu("AVX2", "AuthenticAMD", true).digest(),
            ComputeClass {
                threads: 2,
                ..cpu("AVX2", "AuthenticAMD", true)
            }
            .digest()
        );
        let gpu = ComputeClass {
            device: "cuda:NVIDIA H200".into(),
            ..cpu("AVX2", "AuthenticAMD", true)
        };
        assert_ne!(gpu.digest(), cpu("AVX2", "AuthenticAMD", true).digest());
    }

    #[test]
    fn declared_classes_are_checked() {
        assert!(cpu("AVX2", "AuthenticAMD", false).validate().is_ok());
        let bad = [
            ComputeClass {
                threads: 0,
                ..cpu("AVX2", "x", false)
            },
            ComputeClass {
                threads: u32::MAX,
                ..cpu("AVX2", "x", false)
            },
            ComputeClass {
                cpu_isa: "AVX2".into(),
                ..cpu("AVX512", "x", false)
            },
            ComputeClass {
                mkl_cbwr: "AVX2\0".into(),
                ..cpu("AVX2", "x", false)
            },
            ComputeClass {
                onednn_isa: "AVX2; rm".into(),
                ..cpu("AVX2", "x", false)
            },
            cpu("NEON", "x", false),
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn declared_strings_are_bounded() {
        let c = ComputeClass {
            device: "é".repeat(100),
            ..cpu("AVX2", "x", false)
        }
        .bounded();
        assert!(c.device.len() <= MAX_CLASS_FIELD);
    }
}
