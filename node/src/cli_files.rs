//! The file-sharing subcommands: `share`, `shares`, `unshare`, `fetch`, `search`.
//!
//! Paths are made absolute here, before they reach the node: the node runs in its own
//! working directory (often as a service) and cannot know the caller's.

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use indicatif::{ProgressBar, ProgressStyle};
use servant_protocol::search::Hit;

use crate::{
    api::{IdRequest, ShareRequest},
    cli::{for_each_line, ApiArgs, ApiClient, ClientError},
    fetch::{FetchRequest, Progress},
    store::ContentInfo,
};

fn absolute(path: &Path) -> Result<PathBuf, ClientError> {
    std::path::absolute(path)
        .map_err(|e| ClientError(format!("cannot resolve {}: {e}", path.display())))
}

/// A name from the network as it may be shown on a terminal: control characters
/// (escape sequences included) become `?`.
fn printable(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Sizes the way people read them.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub(crate) async fn share(api: &ApiArgs, path: &Path) -> Result<(), ClientError> {
    let path = absolute(path)?;
    if !path.exists() {
        return Err(ClientError(format!("{} does not exist", path.display())));
    }
    let client = ApiClient::new(api)?;
    let (info, raw): (ContentInfo, _) = client.post("/v1/share", &ShareRequest { path }).await?;
    if api.json {
        println!("{raw}");
    } else {
        println!("{}", info.id);
        eprintln!(
            "shared {} ({}, {} chunks); others fetch it with: servant fetch {}",
            info.name,
            human(info.size),
            info.chunks,
            info.id
        );
    }
    Ok(())
}

pub(crate) async fn shares(api: &ApiArgs) -> Result<(), ClientError> {
    let client = ApiClient::new(api)?;
    let (list, raw): (Vec<ContentInfo>, _) = client.get("/v1/shares").await?;
    if api.json {
        println!("{raw}");
        return Ok(());
    }
    if list.is_empty() {
        println!("the store is empty");
        return Ok(());
    }
    println!(
        "{:<64}  {:>10}  {:<8}  {:<9}  NAME",
        "ID", "SIZE", "STATE", "KIND"
    );
    for c in list {
        let state = if c.pinned {
            "shared".to_string()
        } else if c.complete {
            "fetched".to_string()
        } else {
            format!("{}/{}", c.have_chunks, c.chunks)
        };
        // A fetched file the store links is served from its output: say where, so
        // the user knows moving or editing it stops that.
        let kept = c
            .path
            .map(|p| format!("  (kept at {})", printable(&p.display().to_string())))
            .unwrap_or_default();
        println!(
            "{:<64}  {:>10}  {:<8}  {:<9}  {}{kept}",
            c.id,
            human(c.size),
            state,
            format!("{:?}", c.kind).to_lowercase(),
            printable(&c.name)
        );
    }
    Ok(())
}

pub(crate) async fn unshare(api: &ApiArgs, id: &str) -> Result<(), ClientError> {
    let client = ApiClient::new(api)?;
    let (_, raw): (serde_json::Value, _) = client
        .post("/v1/unshare", &IdRequest { id: id.to_string() })
        .await?;
    if api.json {
        println!("{raw}");
    } else {
        println!("unshared {id}");
    }
    Ok(())
}

pub(crate) async fn fetch(
    api: &ApiArgs,
    id: &str,
    out: Option<PathBuf>,
    force: bool,
) -> Result<(), ClientError> {
    let id = id.trim().parse().map_err(|e| ClientError(format!("{e}")))?;
    let request = FetchRequest {
        id,
        out: out.as_deref().map(absolute).transpose()?,
        dir: match out {
            Some(_) => None,
            None => Some(absolute(Path::new("."))?),
        },
        overwrite: force,
    };
    let client = ApiClient::new(api)?;
    let response = client
        .send(
            client
                .request(reqwest::Method::POST, "/v1/fetch")
                .json(&request),
        )
        .await?;
    let json = api.json;
    let mut view = FetchView::new(json);
    let mut outcome: Option<Result<(), String>> = None;
    for_each_line(response, "fetch", |line| {
        if json {
            let mut stdout = std::io::stdout();
            let _ = stdout.write_all(line);
            let _ = stdout.flush();
        }
        let event: Progress = serde_json::from_slice(line)
            .map_err(|e| ClientError(format!("unexpected answer from the API: {e}")))?;
        match &event {
            Progress::Finished { .. } => outcome = Some(Ok(())),
            Progress::Failed { error, .. } => outcome = Some(Err(error.clone())),
            _ => {}
        }
        view.show(&event);
        Ok(())
    })
    .await?;
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err(error)) => Err(ClientError(error)),
        None => Err(ClientError(
            "the node stopped answering before the fetch ended; run it again to resume".into(),
        )),
    }
}

/// How a fetch looks on a terminal: a progress bar (bytes, rate, providers); in a
/// pipe, one line per event worth a line.
struct FetchView {
    json: bool,
    bar: Option<ProgressBar>,
}

impl FetchView {
    fn new(json: bool) -> Self {
        FetchView { json, bar: None }
    }

    fn show(&mut self, event: &Progress) {
        if self.json {
            return;
        }
        let tty = std::io::stderr().is_terminal();
        match event {
            Progress::Started {
                name,
                size,
                chunks,
                have_chunks,
                providers,
                ..
            } => {
                let name = printable(name);
                if *have_chunks == *chunks && *chunks > 0 {
                    eprintln!("{name} ({}) is already in the store", human(*size));
                    return;
                }
                if *have_chunks > 0 {
                    eprintln!("resuming {name}: {have_chunks} of {chunks} chunks already verified");
                }
                eprintln!(
                    "fetching {name} ({}, {chunks} chunks) from {providers} provider(s)",
                    human(*size)
                );
                if tty {
                    let bar = ProgressBar::new(*size);
                    let style = ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style);
                    self.bar = Some(bar);
                }
            }
            Progress::Progress {
                done_bytes,
                providers,
                ..
            } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(*done_bytes);
                    bar.set_message(format!("{providers} provider(s)"));
                }
            }
            Progress::ProviderDropped { peer, reason } => {
                let line = format!("dropped provider {peer}: {reason}");
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
            Progress::Finished {
                path,
                size,
                providers,
                elapsed_ms,
                ..
            } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                let secs = (*elapsed_ms as f64 / 1000.0).max(0.001);
                let from: Vec<String> = providers
                    .iter()
                    .map(|p| format!("{} ({} chunks)", short(&p.peer), p.chunks))
                    .collect();
                eprintln!(
                    "done: {} in {secs:.1}s ({}/s){}",
                    human(*size),
                    human((*size as f64 / secs) as u64),
                    if from.is_empty() {
                        String::new()
                    } else {
                        format!(" from {}", from.join(", "))
                    }
                );
                if let Some(path) = path {
                    println!("{}", path.display());
                }
            }
            Progress::Failed {
                have_chunks,
                chunks,
                ..
            } => {
                if let Some(bar) = self.bar.take() {
                    bar.abandon();
                }
                if *chunks > 0 {
                    eprintln!("{have_chunks} of {chunks} chunks verified and kept");
                }
            }
        }
    }
}

fn short(peer: &str) -> String {
    let tail: String = peer
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("…{tail}")
}

pub(crate) async fn search(
    api: &ApiArgs,
    term: &str,
    ttl: u8,
    timeout: Duration,
) -> Result<(), ClientError> {
    let client = ApiClient::new(api)?;
    let ms = timeout.as_millis().to_string();
    let ttl = ttl.to_string();
    let response = client
        .send(
            client
                .request(reqwest::Method::GET, "/v1/search")
                .query(&[("term", term), ("ttl", &ttl), ("timeout_ms", &ms)])
                .timeout(timeout + Duration::from_secs(10)),
        )
        .await?;
    let json = api.json;
    let mut count = 0;
    for_each_line(response, "search", |line| {
        count += 1;
        if json {
            let mut stdout = std::io::stdout();
            let _ = stdout.write_all(line);
            let _ = stdout.flush();
            return Ok(());
        }
        let hit: Hit = serde_json::from_slice(line)
            .map_err(|e| ClientError(format!("unexpected answer from the API: {e}")))?;
        println!(
            "{}  {:>10}  {}  (from {})",
            hit.id,
            human(hit.size),
            printable(&hit.name),
            short(&hit.provider)
        );
        Ok(())
    })
    .await?;
    if !json && count == 0 {
        eprintln!("no hits");
    }
    Ok(())
}
