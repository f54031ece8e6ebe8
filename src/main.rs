//! The binary chooses the face: the desktop app when there is no subcommand and no `--no-gui`
//! (falling back to the headless default run when no window can open), else the CLI.

use clap::Parser;
use explora::{cli, gui};

fn main() -> std::process::ExitCode {
    cli::prepare_process();
    let args = cli::Cli::parse();
    if cli::wants_app(&args) {
        match gui::run(&args.device) {
            Ok(gui::Outcome::Closed) => return std::process::ExitCode::SUCCESS,
            Ok(gui::Outcome::NoDisplay(why)) => {
                eprintln!("explora: {why}; running the built-in default headless, as `explora --no-gui` does")
            }
            Err(error) => return cli::exit(Err(error)),
        }
    }
    cli::exit(cli::run(args))
}
