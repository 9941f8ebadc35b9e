//! `server`: the seeder. All of it is in the `seeder` library; this parses flags and logs.

// One async thread: librqbit then reads each 16 KiB block it uploads inline (a page-cache
// read) instead of through `block_in_place`, which on a multi-thread runtime hands the worker
// off for every block and doubled the seeder's CPU per GiB (bench/seed.py: 2.02 -> 0.58
// CPU-s/GiB). Hashing and other blocking work go to tokio's blocking pool.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    daemon::init_logging("info,librqbit=warn,librqbit_dht=warn");
    let config: seeder::Config = daemon::config::parse("seeder");
    match seeder::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
