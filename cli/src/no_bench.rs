//! `tandem bench` in a build without it: its drivers are test code
//! (`tandem-e2e`), which no release build carries, so the cargo feature
//! `bench` brings them in. Without it the command says how to get it.

use std::io::Write;

use clap::Args;

/// Whatever was given: the command refuses it all alike.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

/// Refuses to run, saying how to build a `tandem` that can.
pub async fn bench(_args: BenchArgs, _out: &mut impl Write) -> anyhow::Result<()> {
    anyhow::bail!(
        "this tandem was built without `tandem bench`, whose drivers are test code; \
         build it with `cargo build --release -p tandem-cli --features bench`"
    )
}
