//! `delay_link A B`: join interfaces A and B with a wire that delays each frame (see
//! `tests::delay`). Each line on stdin sets the one-way delay, in milliseconds (0 at first);
//! the process ends when stdin closes. Prints `[READY]` once both interfaces are bound, and
//! `delay=MS` after each change.

use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [a, b] = args.as_slice() else {
        eprintln!("usage: delay_link INTERFACE_A INTERFACE_B  (delays in ms on stdin, one a line)");
        std::process::exit(2);
    };
    let delay = Arc::new(AtomicU64::new(0));
    if let Err(e) = tests::delay::join(a, b, delay.clone()) {
        eprintln!("delay_link {a} {b}: {e}");
        std::process::exit(1);
    }
    println!("[READY] a={a} b={b}");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim().parse::<f64>() {
            Ok(ms) if (0.0..=10_000.0).contains(&ms) => {
                delay.store((ms * 1000.0) as u64, Ordering::Relaxed);
                println!("delay={ms}");
            }
            _ => eprintln!("not a delay in milliseconds (0 to 10000): {line:?}"),
        }
    }
}
