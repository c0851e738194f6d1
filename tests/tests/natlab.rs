//! NAT traversal through real NATs: routers in network namespaces masquerade with
//! iptables, peers behind them learn they are private, reserve on super-peers, and
//! a relayed connection between two NATed peers becomes a direct one by hole
//! punching (see `servant_tests::natlab` for the lab).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use servant::{client::PeerView, traversal::ReachView};
use servant_tests::{
    eventually, in_ci,
    natlab::{self, Lab, Nat},
    run_cli, servant_bin, skip_unless,
};

const LISTEN: &str = "/ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1";

fn reach(lab: &Lab, ns: &str) -> Result<ReachView> {
    let out = lab.run(ns, &servant_bin(), &["doctor", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("doctor --json in {ns}: {out}"))
}

fn peers(lab: &Lab, ns: &str) -> Result<Vec<PeerView>> {
    let out = lab.run(ns, &servant_bin(), &["peers", "--json"])?;
    Ok(serde_json::from_str(&out)?)
}

fn metric(ns: &str, series: &str) -> Result<f64> {
    let script = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:5100/metrics').read().decode())";
    let text = natlab::sh(&["ip", "netns", "exec", ns, "python3", "-c", script])?;
    Ok(servant_tests::metric_value(&text, series).unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natted_peers_go_private_reserve_relays_and_hole_punch() -> Result<()> {
    if skip_unless(
        natlab::available().is_ok(),
        "the NAT lab (root, ip, iptables)",
    ) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::new(dir.path())?;
    let result = scenario(&mut lab, dir.path()).await;
    if result.is_err() {
        for name in ["boot", "s1", "s2", "s3", "pa", "pb"] {
            eprintln!("----- {name} -----\n{}", lab.log_tail(name, 40));
        }
        if in_ci() {
            let kept = dir.keep();
            eprintln!("lab logs kept in {}", kept.display());
        }
    }
    result
}

async fn scenario(lab: &mut Lab, dir: &std::path::Path) -> Result<()> {
    let key = dir.join("boot.key");
    let out = run_cli(
        &["key", "generate", "--out", key.to_str().context("path")?],
        &[],
    );
    if !out.status.success() {
        bail!("key generate: {}", String::from_utf8_lossy(&out.stderr));
    }
    let boot_id = String::from_utf8(out.stdout)?.trim().to_string();
    let bootnode = format!("/ip4/198.18.0.10/tcp/4001/p2p/{boot_id}");

    let mut hosts = vec![("boot", lab.host("boot", "198.18.0.10")?)];
    for (i, name) in ["s1", "s2", "s3"].into_iter().enumerate() {
        hosts.push((name, lab.host(name, &format!("198.18.0.{}", 11 + i))?));
    }
    let pa = lab.natted_peer("ra", "pa", "198.18.0.21", 1, Nat::PortRestricted)?;
    let pb = lab.natted_peer("rb", "pb", "198.18.0.22", 2, Nat::PortRestricted)?;
    println!(
        "checked: lab up: a bootnode and three hosts public, pa and pb behind port-restricted NATs"
    );

    let args = |name: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "--data-dir",
            &dir.join(name).display().to_string(),
            "--listen",
            LISTEN,
            "--api",
            "127.0.0.1:5100",
            "--reach-probe-interval",
            "30s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if name == "boot" {
            a.extend(["--identity-file".into(), key.display().to_string()]);
        } else {
            a.extend(["--bootnode".into(), bootnode.clone()]);
        }
        a
    };
    let bin = servant_bin();
    for (name, ns) in &hosts {
        lab.spawn(ns, name, &bin, &args(name))?;
        if *name == "boot" {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    lab.spawn(&pa, "pa", &bin, &args("pa"))?;
    lab.spawn(&pb, "pb", &bin, &args("pb"))?;

    let lab_ref = &*lab;
    let supers: Vec<String> = hosts[1..].iter().map(|(_, ns)| ns.clone()).collect();
    eventually(
        Duration::from_secs(90),
        "the public hosts to be super-peers",
        || async {
            for ns in &supers {
                let Ok(view) = reach(lab_ref, ns) else {
                    return Ok(None);
                };
                if view.reachability.as_str() != "public" || view.role.as_str() != "super" {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    println!("checked: s1, s2, s3 confirmed public by dial-backs and became super-peers");

    for ns in [&pa, &pb] {
        let view = eventually(
            Duration::from_secs(120),
            "a NATed peer to be private with two reservations",
            || async {
                let Ok(view) = reach(lab_ref, ns) else {
                    return Ok(None);
                };
                let accepted = view.reservations.iter().filter(|r| r.accepted).count();
                Ok((view.reachability.as_str() == "private"
                    && view.role.as_str() == "peer"
                    && accepted == 2)
                    .then_some(view))
            },
        )
        .await?;
        println!(
            "checked: {ns}: private ({}), role peer, reservations on {:?}",
            view.reason,
            view.reservations
                .iter()
                .map(|r| &r.relay[..16])
                .collect::<Vec<_>>()
        );
    }

    // pa dials pb through one of pb's relays; DCUtR makes it direct.
    let view_b = reach(lab_ref, &pb)?;
    let circuit = view_b
        .reservations
        .iter()
        .flat_map(|r| r.addrs.iter())
        .find(|a| a.contains("/quic-v1/"))
        .or_else(|| {
            view_b
                .reservations
                .iter()
                .flat_map(|r| r.addrs.iter())
                .next()
        })
        .cloned()
        .context("pb has no circuit address")?;
    let pb_id = circuit.rsplit('/').next().unwrap_or_default().to_string();
    lab.run(&pa, &bin, &["connect", &circuit, "--json"])?;
    println!("checked: pa reached pb through its relay: {circuit}");
    let lab_ref = &*lab;
    eventually(
        Duration::from_secs(60),
        "a direct connection between pa and pb",
        || async {
            let direct = peers(lab_ref, &pa)?
                .into_iter()
                .filter(|v| v.peer_id == pb_id)
                .any(|v| v.addrs.iter().any(|a| !a.contains("p2p-circuit")));
            let series = "servant_holepunch_results_total{reason=\"direct\"}";
            let punched = metric(&pa, series)? + metric(&pb, series)?;
            Ok((direct && punched >= 1.0).then_some(()))
        },
    )
    .await?;
    let punches: Vec<_> = reach(lab_ref, &pa)?
        .holepunches
        .into_iter()
        .chain(reach(lab_ref, &pb)?.holepunches)
        .collect();
    println!("checked: DCUtR punched through both NATs: {punches:?}");

    let text = lab.run(&pa, &bin, &["doctor"])?;
    assert!(text.contains("(private)"), "{text}");
    assert!(text.contains("Relay reservation held on"), "{text}");
    println!("checked: servant doctor on pa says private and names its relays");
    Ok(())
}
