//! `worker --join dtrain://...`: joins a run and works until it ends ([`worker::cli`]).

fn main() -> anyhow::Result<()> {
    worker::cli::main()
}
