//! `coordinator`: places shards on nodes and tells the swarm when it is ready. All of it is in
//! the `coordinator` library; this parses flags and logs.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    daemon::init_logging("info");
    match coordinator::run(daemon::config::parse("coordinator")).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
