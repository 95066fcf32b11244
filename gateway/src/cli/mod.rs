//! The `tagway` command line: `run`, `check`, `tags`, `--version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod check;
pub mod run;
pub mod tags;

/// tagway: a TCP service-mesh gateway for Consul and Nomad.
#[derive(Debug, Parser)]
#[command(name = "tagway", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run {
        /// The static configuration file (TOML or YAML).
        #[arg(long, short, env = "TAGWAY_CONFIG")]
        config: PathBuf,
    },
    /// Validate the static configuration and the file provider's files, print each error or a
    /// summary; exit non-zero on errors.
    Check {
        /// The static configuration file (TOML or YAML).
        #[arg(long, short, env = "TAGWAY_CONFIG")]
        config: PathBuf,
    },
    /// Print the dynamic configuration some Consul tags produce (as JSON), or their errors.
    Tags {
        /// The tag prefix.
        #[arg(long, default_value = "traefik")]
        prefix: String,
        /// The tags (`traefik.tcp.routers.r.rule=…`); read from stdin, one per line, when none.
        tags: Vec<String>,
    },
}

/// Runs the command line with the process arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run::main(&config),
        Command::Check { config } => check::main(&config),
        Command::Tags { prefix, tags } => tags::main(&prefix, tags),
    }
}
