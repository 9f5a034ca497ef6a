//! The `heartbeat` binary: parse the command line, set up logging, run.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let logs = cli::init_tracing(args.log_format);
    match cli::run(args, &logs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, naming the value and the fix; details are in the chain.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
