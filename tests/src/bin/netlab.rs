//! `netlab [--block-udp]`: the NAT swarm of `tests::nat` (four nodes in two homes behind
//! delayed router links, the rendezvous host public) for `bench/wan.py` to measure. Prints
//! `[READY] http=ADDR` once the swarm serves the whole model's text exactly. Then reads
//! commands on stdin, one a line, answering each with one line:
//!
//! - `delay MS`: the one-way delay of each home's link to the public network → `ok`;
//! - `links`: per route edge, the delayed links it crosses one way, as JSON → `[1,0,2,0,1]`.
//!
//! Everything (processes, namespaces) is stopped and deleted when stdin closes. Needs root.

use std::io::{BufRead, Write};
use std::time::Duration;

fn main() {
    let block_udp = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--block-udp") => true,
        Some(_) => {
            eprintln!("usage: netlab [--block-udp]  (then `delay MS` or `links` on stdin)");
            std::process::exit(2);
        }
    };
    let mut swarm = tests::nat::nat_swarm(!block_udp, true);
    swarm.check();
    println!("[READY] http={}", swarm.http);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["delay", ms] => match ms.parse::<f64>() {
                Ok(ms) if (0.0..=10_000.0).contains(&ms) => {
                    for home in &mut swarm.homes {
                        home.set_delay(Duration::from_secs_f64(ms / 1000.0));
                    }
                    "ok".to_owned()
                }
                _ => format!("error: not a delay in milliseconds (0 to 10000): {ms}"),
            },
            ["links"] => serde_json::to_string(&swarm.delayed_links_crossed(&swarm.status()))
                .expect("a list of numbers"),
            _ => format!("error: unknown command {line:?} (delay MS, links)"),
        };
        println!("{answer}");
        let _ = std::io::stdout().flush();
    }
}
