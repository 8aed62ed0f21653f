//! Run paths to the libtorch of the `torch` package in the same environment: pip installs
//! this program into `<env>/bin/` and torch's shared libraries into
//! `<env>/lib/pythonX.Y/site-packages/torch/lib/`, so `$ORIGIN/../lib/pythonX.Y/...` finds
//! them for every Python version the wheel allows (and `--user` installs under
//! `~/.local/bin` and `~/.local/lib/pythonX.Y/site-packages`).

/// The Python versions torch 2.11 ships wheels for, and a few after.
const PYTHON_MINORS: std::ops::RangeInclusive<u32> = 10..=16;

fn main() {
    for minor in PYTHON_MINORS {
        // site-packages: venvs and --user; dist-packages: Debian's system Python.
        for dir in ["site-packages", "dist-packages"] {
            println!(
                "cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/../lib/python3.{minor}/{dir}/torch/lib"
            );
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
