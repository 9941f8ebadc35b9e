//! Nodes behind home routers (network namespaces, nftables masquerade, unsolicited inbound
//! dropped) join a swarm whose seeder, relay and coordinator are on a public address, fetch
//! their shards, and serve the whole model's greedy text over the mesh; `/status` names every
//! edge's kind. Needs root (CI runs as root).
//!
//! The homes: 10.1.0.0/24 and 10.2.0.0/24, two nodes each, behind routers at 198.19.0.11 and
//! .12; the rendezvous host (seeder with `--relay-port`, coordinator) at 198.19.0.1.

use std::time::Duration;

use serde_json::Value;
use tests::api::PROMPTS;
use tests::nat::nat_swarm;
use tests::swarm_lock;

fn must_be_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the NAT tests build network namespaces: run them as root (CI does)"
    );
}

#[test]
fn nodes_behind_two_home_nats_serve_the_whole_models_text_over_punched_holes() {
    must_be_root();
    let _one = swarm_lock();
    let swarm = nat_swarm(true, false);
    swarm.check();
}

#[test]
fn with_udp_between_the_homes_blocked_their_edges_go_through_the_relay_and_stay_exact() {
    must_be_root();
    let _one = swarm_lock();
    let swarm = nat_swarm(false, false);
    swarm.check();
}

/// With UDP between the homes blocked, the edge between them runs through the relay. Home 2
/// loses its relay connections (its router resets them and refuses new ones for 3 s) while a
/// request is in flight: the nodes reconnect, the request completes or fails over with the
/// whole model's text, and the next request runs through the relay again.
#[test]
fn a_home_that_loses_the_relay_mid_request_reconnects_and_the_text_stays_exact() {
    must_be_root();
    let _one = swarm_lock();
    let swarm = nat_swarm(false, false);
    swarm.check();
    let prompt = PROMPTS[0];
    let reference = llm::reference_completion(&tests::api::model(), prompt, 64, 1).unwrap();
    let base = format!("http://{}", swarm.http);
    let asking = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(180))
            .build()
            .unwrap();
        let body: Value = client
            .post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({"prompt": prompt, "max_tokens": 64, "temperature": 0}))
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("the request in flight: {e}"));
        eprintln!("the request in flight took {:?}", started.elapsed());
        body
    });
    std::thread::sleep(Duration::from_millis(150));
    swarm.homes[1].cut_tcp_to(&swarm.public, swarm.relay_port);
    assert!(
        !asking.is_finished(),
        "the request ended before the relay was cut: nothing was in flight"
    );
    std::thread::sleep(Duration::from_secs(3));
    swarm.homes[1].mend();
    let body = asking.join().unwrap();
    assert_eq!(
        body["choices"][0]["text"],
        reference.text.as_str(),
        "the request in flight: {body}"
    );
    // Reconnected: the relay carries the edge between the homes again.
    swarm.check();
}

/// Both routers reach the public network through a wire with a one-way delay (`delay_link`,
/// user space: this kernel has no netem). The swarm serves exact text through it, and each
/// edge's measured round trip grows by the delays it crosses: twice the delay between the
/// coordinator and a home, four times between the homes.
#[test]
fn homes_behind_a_wan_delay_serve_exact_text_and_their_edges_measure_the_delay() {
    must_be_root();
    let _one = swarm_lock();
    let mut swarm = nat_swarm(true, true);
    swarm.check();
    let delay = Duration::from_millis(20);
    for home in &mut swarm.homes {
        home.set_delay(delay);
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let base = format!("http://{}", swarm.http);
    let mut last = Vec::new();
    let measured = (0..60).any(|_| {
        swarm.exercise(&client);
        let status = swarm.status();
        let crossings = swarm.delayed_links_crossed(&status);
        last = tests::route_edges(&status)
            .iter()
            .zip(&crossings)
            .map(|(edge, &links)| (edge["rtt_us"].as_u64().unwrap_or(0), links))
            .collect();
        let enough =
            |&(rtt_us, links): &(u64, u32)| Duration::from_micros(rtt_us) >= 2 * links * delay;
        if !last.is_empty() && last.iter().all(enough) {
            true
        } else {
            std::thread::sleep(Duration::from_millis(500));
            false
        }
    });
    assert!(
        measured,
        "(round trip µs, delayed links crossed) per edge, with {delay:?} on each link: {last:?}"
    );
    eprintln!("(round trip µs, delayed links crossed) per edge: {last:?}");
    assert!(
        last.iter().any(|&(_, links)| links == 2),
        "the route never crossed between the homes: {last:?}"
    );
    tests::api::assert_texts_equal_the_whole_model(&client, &base, None, &PROMPTS[..2]);
}
