//! The `launcher` binary: a thin wrapper over the library (see `launcher --help` and
//! docs/cluster.md). Prints the outcome and exits with the status [`launcher::supervise::exit`]
//! documents.

use clap::Parser;
use launcher::plan::{Args, Plan};
use launcher::supervise::{self, exit};

fn main() {
    let args = Args::parse();
    let plan = match Plan::resolve(args, &|k| std::env::var(k).ok()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {}", formats::report::error_chain(&e));
            std::process::exit(exit::USAGE);
        }
    };
    let outcome = supervise::run(&plan);
    let node = plan.node_rank;
    if outcome.code == exit::FINISHED {
        eprintln!("[launcher node {node}] {}", outcome.message);
    } else {
        eprintln!("[launcher node {node}] error: {}", outcome.message);
    }
    std::process::exit(outcome.code);
}
