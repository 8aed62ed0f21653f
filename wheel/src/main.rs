//! `dtrain-worker --join dtrain://...`: the volunteer worker as the Python wheel installs it
//! (the same program as `worker`, [`worker::cli`]). It runs on the libtorch of the `torch`
//! package installed beside it (see `build.rs`).

fn main() -> anyhow::Result<()> {
    worker::cli::main()
}
