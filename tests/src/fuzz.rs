//! What each fuzz target does with one input, as plain functions.
//!
//! The libFuzzer targets under `fuzz/` (a crate of its own, outside the workspace,
//! because cargo-fuzz builds it with special flags) call these, and so does
//! `tests/tests/fuzz_corpus.rs`, which replays every committed corpus file as an
//! ordinary `cargo test`: an input that once crashed stays a regression test in CI
//! even where no fuzzer runs.
//!
//! Each function feeds the bytes to one of the node's parsers of untrusted input and
//! panics only when an invariant breaks: a decoded value that does not survive its
//! own encoding, a limit exceeded after a successful decode, a time-to-live that
//! grows. A parser returning an error is the expected outcome for most inputs.
//!
//! [`seeds`] builds the starting corpus from the real encoders (valid messages and
//! near-misses), so a fuzzer starts past the outer checks.

use std::{
    cell::RefCell,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::{Args, FromArgMatches};
use futures::{executor::block_on, io::Cursor};
use libp2p::{identity::Keypair, request_response::Codec, Multiaddr, PeerId};
use servant::{
    addr,
    api::TargetRequest,
    client::ConnectTarget,
    codecs::{FileCodec, SearchCodec, FILE_PROTOCOL, SEARCH_PROTOCOL},
    config::{Config, RunArgs},
    deny::BanTarget,
    reach::wire,
    search::{HitsVerdict, QueryVerdict, Searches},
};
use servant_protocol::{
    file::{self, Request, Response},
    manifest::{self, Entry, Hash, Kind, Manifest, MAX_PATH_DEPTH},
    search::{self as search_proto, Ack, Hit, Message, MAX_TTL},
    validate_topic, Envelope,
};

/// What a target does with one input.
pub type Target = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus/` and the binary under
/// `fuzz/fuzz_targets/`) and its per-input function.
pub const TARGETS: &[(&str, Target)] = &[
    ("file_request", file_request),
    ("file_response", file_response),
    ("file_codec", file_codec),
    ("search_message", search_message),
    ("search_codec", search_codec),
    ("envelope", envelope),
    ("manifest", manifest),
    ("config_toml", config_toml),
    ("config_flags", config_flags),
    ("api_target", api_target),
    ("autonat_wire", autonat_wire),
];

/// `/servant/file/1.0.0` request payloads: a decoded request re-encodes to exactly
/// the input (the format has one spelling) and fits the request limit.
pub fn file_request(data: &[u8]) {
    if let Ok(request) = Request::decode(data) {
        let bytes = request.encode();
        assert_eq!(bytes, data, "a request has one encoding");
        assert!(bytes.len() <= file::MAX_REQUEST_BYTES);
    }
}

/// `/servant/file/1.0.0` response payloads (kind byte and data): a decoded response
/// re-encodes to the input, fits the response limit, and the split reader
/// ([`Response::from_parts`]) agrees with the whole-payload one.
pub fn file_response(data: &[u8]) {
    let whole = Response::decode(data.to_vec());
    if let Ok(response) = &whole {
        assert_eq!(response.encode(), data, "a response has one encoding");
        assert!(data.len() <= file::MAX_RESPONSE_BYTES);
    }
    if let Some((&kind, rest)) = data.split_first() {
        let parts = Response::from_parts(kind, rest.to_vec());
        assert_eq!(parts, whole, "from_parts and decode disagree");
    }
}

/// The file protocol's stream framing (node/src/codecs.rs) over a stream holding
/// these bytes, read as a request and as a response. Whatever was read is written
/// back and must come out as the same frame the reader consumed.
pub fn file_codec(data: &[u8]) {
    let mut codec = FileCodec;
    if let Ok(request) = block_on(codec.read_request(&FILE_PROTOCOL, &mut Cursor::new(data))) {
        let mut out = Vec::new();
        block_on(codec.write_request(&FILE_PROTOCOL, &mut Cursor::new(&mut out), request))
            .unwrap_or_else(|e| panic!("writing a request that was read: {e}"));
        assert!(data.starts_with(&out), "a request frame has one encoding");
    }
    if let Ok(response) = block_on(codec.read_response(&FILE_PROTOCOL, &mut Cursor::new(data))) {
        let mut out = Vec::new();
        block_on(codec.write_response(&FILE_PROTOCOL, &mut Cursor::new(&mut out), response))
            .unwrap_or_else(|e| panic!("writing a response that was read: {e}"));
        assert!(data.starts_with(&out), "a response frame has one encoding");
    }
}

/// A fixed PeerId for the node-side bookkeeping, so runs are reproducible.
fn fixed_peer(seed: u8) -> PeerId {
    let key = Keypair::ed25519_from_bytes([seed; 32]).expect("32 bytes make an ed25519 key");
    key.public().to_peer_id()
}

/// `/servant/search/1.0.0` messages and acks: a decoded message is valid, survives
/// its encoding, and the node's bookkeeping ([`Searches`]) accepts a fresh query
/// once, with a forwarding time-to-live below both [`MAX_TTL`] and the one received,
/// and delivers hits for a local search without exceeding what was sent.
pub fn search_message(data: &[u8]) {
    if let Ok(message) = Message::decode(data) {
        assert_eq!(message.validate(), Ok(()));
        let again = Message::decode(&message.encode())
            .unwrap_or_else(|e| panic!("a decoded message re-encodes to a valid one: {e}"));
        assert_eq!(again, message);
        let now = Instant::now();
        let peer = fixed_peer(1);
        let mut searches = Searches::new(60);
        match &message {
            Message::Query { id, term, ttl } => {
                match searches.on_query(peer, id, *ttl, now) {
                    QueryVerdict::Accept { forward_ttl } => {
                        assert!(forward_ttl < MAX_TTL, "forwarded ttl {forward_ttl}");
                        assert!(forward_ttl < (*ttl).max(1), "ttl {ttl} -> {forward_ttl}");
                    }
                    other => panic!("a fresh query was not accepted: {other:?}"),
                }
                assert_eq!(
                    searches.on_query(fixed_peer(2), id, *ttl, now),
                    QueryVerdict::Duplicate
                );
                search_proto::matches(term, "annual-report.pdf", &Hash::of(b"x"));
            }
            Message::Hits { id, hits } => {
                let _receiver = searches.start_local(id.clone(), now);
                match searches.on_hits(peer, id, hits.clone(), now) {
                    HitsVerdict::Delivered(n) => assert!(n <= hits.len()),
                    other => panic!("hits for a local search were not delivered: {other:?}"),
                }
            }
        }
        searches.prune(now + Duration::from_secs(3600), |_| false);
        assert!(searches.is_empty(), "expired queries are forgotten");
    }
    if let Ok(ack) = search_proto::decode_ack(data) {
        assert_eq!(
            search_proto::decode_ack(&search_proto::encode_ack(ack)),
            Ok(ack)
        );
    }
}

/// The search protocol's stream framing (node/src/codecs.rs), read as a request and
/// as a response; whatever was read survives being written and read again.
pub fn search_codec(data: &[u8]) {
    let mut codec = SearchCodec;
    if let Ok(message) = block_on(codec.read_request(&SEARCH_PROTOCOL, &mut Cursor::new(data))) {
        let mut out = Vec::new();
        block_on(codec.write_request(
            &SEARCH_PROTOCOL,
            &mut Cursor::new(&mut out),
            message.clone(),
        ))
        .unwrap_or_else(|e| panic!("writing a message that was read: {e}"));
        let again = block_on(codec.read_request(&SEARCH_PROTOCOL, &mut Cursor::new(&out)))
            .unwrap_or_else(|e| panic!("reading a message that was written: {e}"));
        assert_eq!(again, message);
    }
    if let Ok(ack) = block_on(codec.read_response(&SEARCH_PROTOCOL, &mut Cursor::new(data))) {
        let mut out = Vec::new();
        block_on(codec.write_response(&SEARCH_PROTOCOL, &mut Cursor::new(&mut out), ack))
            .unwrap_or_else(|e| panic!("writing an ack that was read: {e}"));
        let again = block_on(codec.read_response(&SEARCH_PROTOCOL, &mut Cursor::new(&out)))
            .unwrap_or_else(|e| panic!("reading an ack that was written: {e}"));
        assert_eq!(again, ack);
    }
}

/// The broadcast envelope (what a gossipsub message carries): a decoded envelope
/// carries its content id, is rebuilt identically from its fields, survives its
/// encoding, and its age check neither panics at the clock's extremes nor refuses it
/// at its own time.
pub fn envelope(data: &[u8]) {
    let Ok(envelope) = Envelope::decode(data) else {
        return;
    };
    assert_eq!(envelope.id, envelope.content_id());
    let rebuilt = Envelope::new(
        envelope.title.clone(),
        envelope.body.clone(),
        envelope.time,
        envelope.origin.clone(),
    )
    .unwrap_or_else(|e| panic!("the fields of a decoded envelope are within limits: {e}"));
    assert_eq!(rebuilt, envelope);
    // Re-encoding can only shrink JSON that was accepted (no whitespace, shortest
    // escapes), so it stays under the size limit and decodes again.
    let bytes = envelope
        .encode()
        .unwrap_or_else(|e| panic!("a decoded envelope encodes: {e}"));
    assert_eq!(Envelope::decode(&bytes), Ok(envelope.clone()));
    let time = envelope.time;
    for now in [
        0,
        time.saturating_sub(1),
        time,
        time.saturating_add(1),
        u64::MAX,
    ] {
        for (max_age, max_skew) in [(0, 0), (300_000, 30_000), (u64::MAX, u64::MAX)] {
            let verdict = envelope.check_age(now, max_age, max_skew);
            if now == time {
                assert_eq!(
                    verdict,
                    Ok(()),
                    "an envelope is never too old at its own time"
                );
            }
        }
    }
}

/// Manifests (as fetched from a provider): a decoded manifest is valid, survives its
/// encoding, and every chunk it lists maps to a non-empty range of one file, with
/// [`Manifest::chunk`] and [`Manifest::chunks`] agreeing. The input as text is also
/// run through [`manifest::sanitize_path`], which must never produce a path that
/// leaves the directory it is joined to.
pub fn manifest(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(path) = manifest::sanitize_path(text) {
            let mut depth = 0;
            for component in path.components() {
                assert!(
                    matches!(component, std::path::Component::Normal(_)),
                    "{text:?} sanitized to {path:?}"
                );
                depth += 1;
            }
            assert!(depth <= MAX_PATH_DEPTH);
        }
    }
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    assert_eq!(m.validate(), Ok(()));
    assert_eq!(Manifest::decode(&m.encode()).as_ref(), Ok(&m));
    let count = m.chunk_count();
    let chunk_size = u64::from(m.chunk_size);
    // Every chunk is checked against the indexed lookup, up to a bound that keeps
    // one input fast (the lookup walks the entries).
    for (index, chunk) in m.chunks().enumerate().take(512) {
        assert_eq!(m.chunk(index as u64), Some(chunk));
        assert!(chunk.len >= 1 && u64::from(chunk.len) <= chunk_size);
        let entry = &m.entries[chunk.entry];
        assert!(chunk.offset + u64::from(chunk.len) <= entry.size);
    }
    assert_eq!(m.chunks().count(), count);
    assert_eq!(m.chunk(count as u64), None);
    assert_eq!(m.chunk(u64::MAX), None);
    let total: u64 = m.entries.iter().map(|e| e.size).sum();
    assert_eq!(m.total_size(), total);
    for index in 0..m.entries.len().min(512) {
        assert!(
            m.entry_path(index).is_some(),
            "entry {index} of a valid manifest has a path"
        );
    }
    assert!(!m.safe_name().is_empty());
}

thread_local! {
    /// A scratch file per thread: [`Config::load`] reads a path, and the replay test
    /// runs targets on several threads at once.
    static SCRATCH: PathBuf = std::env::temp_dir().join(format!(
        "servant-fuzz-{}-{:?}.toml",
        std::process::id(),
        std::thread::current().id()
    ));
    /// `servant run`'s flags as a clap command, built once per thread.
    static RUN_COMMAND: RefCell<clap::Command> =
        RefCell::new(RunArgs::augment_args(clap::Command::new("run").no_binary_name(true)));
}

/// Loads a config file with these contents the way `servant run --config` does.
fn load_file(text: &str, args: &RunArgs) -> Result<Config, servant::config::ConfigError> {
    SCRATCH.with(|path| {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let loaded = Config::load(Some(path), args);
        let _ = std::fs::remove_file(path);
        loaded
    })
}

/// What `servant run --print-config` prints must load back as the same config.
fn assert_reloads(config: &Config) {
    let rendered = config.to_toml();
    let back = load_file(&rendered, &RunArgs::default())
        .unwrap_or_else(|e| panic!("the printed config does not load: {e}\n{rendered}"));
    assert_eq!(
        &back, config,
        "the printed config loads differently:\n{rendered}"
    );
}

/// A config file: parsed and validated as `servant run --config FILE` would; a
/// config that loads prints (`--print-config`) as TOML that loads back the same.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = load_file(text, &RunArgs::default()) {
        assert_reloads(&config);
    }
}

/// `servant run`'s flags, one argument per input line (the flags and the
/// `SERVANT_*` variables share their parsers): parsed by clap as the binary does,
/// merged and validated by [`Config::load`]; a config that loads prints as TOML
/// that loads back the same.
pub fn config_flags(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let argv: Vec<&str> = text.split('\n').take(64).collect();
    let matches = RUN_COMMAND.with(|command| command.borrow_mut().try_get_matches_from_mut(argv));
    let Ok(matches) = matches else {
        return;
    };
    let Ok(args) = RunArgs::from_arg_matches(&matches) else {
        return;
    };
    if let Ok(config) = Config::load(None, &args) {
        assert_reloads(&config);
    }
}

/// The targets the API takes as text (`POST /v1/connect`, `/v1/ban`, `/v1/unban`
/// with a JSON body, and topic names and content ids elsewhere): the body is read as
/// the handlers' JSON, else the input is taken as the target text itself. A parsed
/// ban target prints as text that parses back to it, so `servant bans` output can
/// be fed to `servant unban`.
pub fn api_target(data: &[u8]) {
    let text = match serde_json::from_slice::<TargetRequest>(data) {
        Ok(request) => request.target,
        Err(_) => match std::str::from_utf8(data) {
            Ok(text) => text.to_string(),
            Err(_) => return,
        },
    };
    if let Ok(target) = text.parse::<ConnectTarget>() {
        if let ConnectTarget::Addr(address) = &target {
            address_helpers(address);
        }
        let _ = target.to_string().parse::<ConnectTarget>();
    }
    if let Ok(ban) = text.parse::<BanTarget>() {
        let shown = ban.to_string();
        assert_eq!(
            shown.parse::<BanTarget>(),
            Ok(ban),
            "{text:?} shows as {shown:?}"
        );
    }
    let _ = validate_topic(&text);
    if let Ok(hash) = text.parse::<Hash>() {
        assert_eq!(hash.to_hex(), text.to_ascii_lowercase());
    }
}

/// The node's questions about an address (node/src/addr.rs), none of which may panic.
fn address_helpers(address: &Multiaddr) {
    addr::is_dialable(address);
    addr::is_relayed(address);
    addr::is_link_local(address);
    if let Some(ip) = addr::ip_of(address) {
        // An IPv4-mapped IPv6 address must come back as IPv4, or it would slip past
        // an IPv4 ban.
        let mapped = matches!(ip, std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
        assert!(!mapped, "{address} gave {ip}");
    }
    addr::transport(address);
    let bare = addr::without_p2p(address.clone());
    assert!(bare.len() <= address.len());
}

/// The AutoNAT v2 messages Servant's own reachability client reads from a server
/// (node/src/reach/wire.rs): a varint-framed protobuf of at most its limit; what was
/// read survives being written and read again.
pub fn autonat_wire(data: &[u8]) {
    let mut input = data;
    if let Ok(message) = block_on(wire::read::<wire::Message>(
        &mut input,
        wire::MAX_MESSAGE_BYTES,
    )) {
        let mut out = Vec::new();
        block_on(wire::write(&mut out, &message))
            .unwrap_or_else(|e| panic!("writing a message that was read: {e}"));
        let again: wire::Message = block_on(wire::read(&mut out.as_slice(), usize::MAX))
            .unwrap_or_else(|e| panic!("reading a message that was written: {e}"));
        assert_eq!(again, message);
    }
    let mut input = data;
    if let Ok(back) = block_on(wire::read::<wire::DialBack>(
        &mut input,
        wire::MAX_DIAL_BACK_BYTES,
    )) {
        let mut out = Vec::new();
        block_on(wire::write(&mut out, &back))
            .unwrap_or_else(|e| panic!("writing a dial-back that was read: {e}"));
        assert!(out.len() <= wire::MAX_DIAL_BACK_BYTES + 1);
    }
}

/// One starting input for a target.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The target it is for.
    pub target: &'static str,
    /// A file name saying what it is (`valid-…` or `invalid-…`).
    pub name: String,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Starting inputs for every target, made with the real encoders: valid messages,
/// and near-misses that stop at each check (a wrong kind, a length one over, a
/// declared 4 GiB, a forged id, a bad field).
pub fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, name: &str, data: Vec<u8>| {
        seeds.push(Seed {
            target,
            name: name.to_string(),
            data,
        })
    };
    let id = Hash::of(b"servant fuzz seed");
    let peer = fixed_peer(7).to_string();

    // File protocol payloads and frames.
    let manifest_request = Request::Manifest(id).encode();
    let chunk_request = Request::Chunk { id, index: 3 }.encode();
    add("file_request", "valid-manifest", manifest_request.clone());
    add("file_request", "valid-chunk", chunk_request.clone());
    add(
        "file_request",
        "invalid-short-chunk",
        chunk_request[..40].to_vec(),
    );
    add("file_request", "invalid-kind", [&[9u8][..], &id.0].concat());
    let responses = [
        (
            "valid-manifest",
            Response::Manifest(small_manifest().encode()),
        ),
        ("valid-chunk", Response::Chunk(vec![0xab; 300])),
        ("valid-not-found", Response::NotFound),
        ("valid-busy", Response::Busy),
        ("valid-bad-request", Response::BadRequest),
    ];
    for (name, response) in &responses {
        add("file_response", name, response.encode());
    }
    add("file_response", "invalid-busy-with-data", vec![4, 1]);
    add("file_response", "invalid-kind", vec![0x7f, 1, 2, 3]);
    let frame = |payload: &[u8]| [&(payload.len() as u32).to_be_bytes()[..], payload].concat();
    add("file_codec", "valid-chunk-request", frame(&chunk_request));
    add(
        "file_codec",
        "valid-manifest-request",
        frame(&manifest_request),
    );
    for (name, response) in &responses {
        add(
            "file_codec",
            &format!("{name}-response"),
            frame(&response.encode()),
        );
    }
    add(
        "file_codec",
        "invalid-4gib",
        vec![0xff, 0xff, 0xff, 0xff, 2, 0],
    );
    let over = manifest::MAX_CHUNK_SIZE + 2;
    add(
        "file_codec",
        "invalid-chunk-over-limit",
        [&over.to_be_bytes()[..], &[2]].concat(),
    );
    add("file_codec", "invalid-empty-frame", vec![0, 0, 0, 0]);
    add(
        "file_codec",
        "invalid-truncated",
        frame(&chunk_request)[..20].to_vec(),
    );

    // Search messages and frames.
    let qid = "0123456789abcdef0123456789abcdef".to_string();
    let query = Message::Query {
        id: qid.clone(),
        term: "Report".into(),
        ttl: 3,
    };
    let hits = Message::Hits {
        id: qid.clone(),
        hits: vec![Hit {
            id,
            name: "report.pdf".into(),
            size: 123_456,
            kind: Kind::File,
            provider: peer.clone(),
            addrs: vec![format!("/ip4/192.0.2.1/tcp/4001/p2p/{peer}")],
        }],
    };
    let high_ttl = Message::Query {
        id: qid.clone(),
        term: "x".into(),
        ttl: u8::MAX,
    };
    let zero_ttl = Message::Query {
        id: qid.clone(),
        term: "x".into(),
        ttl: 0,
    };
    for (name, message) in [
        ("valid-query", &query),
        ("valid-hits", &hits),
        ("valid-query-ttl-255", &high_ttl),
        ("valid-query-ttl-0", &zero_ttl),
    ] {
        add("search_message", name, message.encode());
        add(
            "search_codec",
            &format!("{name}-frame"),
            frame(&message.encode()),
        );
    }
    add(
        "search_message",
        "valid-ack",
        search_proto::encode_ack(Ack::RateLimited),
    );
    add(
        "search_message",
        "invalid-query-id",
        br#"{"type":"query","id":"xyz","term":"a","ttl":1}"#.to_vec(),
    );
    add(
        "search_message",
        "invalid-unknown-field",
        br#"{"type":"query","id":"0123456789abcdef0123456789abcdef","term":"a","ttl":1,"x":0}"#
            .to_vec(),
    );
    add(
        "search_message",
        "invalid-ttl-256",
        br#"{"type":"query","id":"0123456789abcdef0123456789abcdef","term":"a","ttl":256}"#
            .to_vec(),
    );
    add(
        "search_codec",
        "valid-ack-frame",
        frame(&search_proto::encode_ack(Ack::Duplicate)),
    );
    add(
        "search_codec",
        "invalid-4gib",
        vec![0xff, 0xff, 0xff, 0xff, b'{'],
    );

    // Broadcast envelopes.
    let valid = Envelope::new("#BROADCAST", "Hello world", 1_763_780_000_000, peer.clone())
        .unwrap_or_else(|e| panic!("a seed envelope: {e}"));
    let encoded = valid.encode().unwrap_or_else(|e| panic!("encode: {e}"));
    add("envelope", "valid", encoded.clone());
    let escaped = Envelope::new("t\u{1}", "line\n\"quoted\" \u{e9}", u64::MAX, peer.clone())
        .unwrap_or_else(|e| panic!("a seed envelope: {e}"));
    add(
        "envelope",
        "valid-escapes-max-time",
        escaped.encode().unwrap_or_else(|e| panic!("encode: {e}")),
    );
    let mut forged = valid.clone();
    forged.body = "tampered".into();
    add(
        "envelope",
        "invalid-forged-id",
        serde_json::to_vec(&forged).unwrap_or_default(),
    );
    add(
        "envelope",
        "invalid-duplicate-field",
        String::from_utf8_lossy(&encoded)
            .replacen("\"title\"", "\"title\":\"a\",\"title\"", 1)
            .into_bytes(),
    );

    // Manifests and paths.
    add("manifest", "valid-file", small_manifest().encode());
    add("manifest", "valid-dir", small_dir().encode());
    let mut wrong_count = small_manifest();
    wrong_count.entries[0].chunks.pop();
    add("manifest", "invalid-chunk-count", wrong_count.encode());
    let mut escape = small_dir();
    escape.entries[0].path = "../../etc/passwd".into();
    add("manifest", "invalid-path-escape", escape.encode());
    add("manifest", "path-hostile", b"a/..\\b/\0c/./d".to_vec());

    // Config: a file using every kind of value, and flags.
    add(
        "config_toml",
        "valid-full",
        format!(
            "data_dir = \"/var/lib/servant\"\n\
             listen = [\"/ip4/0.0.0.0/tcp/4001\", \"/ip6/::/udp/4001/quic-v1\"]\n\
             bootnodes = [\"/dns4/boot.example/tcp/4001/p2p/{peer}\"]\n\
             api = \"127.0.0.1:5100\"\n\
             conn_low = 8\nconn_high = 32\n\
             deny_peers = [\"{peer}\"]\n\
             deny_cidrs = [\"10.0.0.0/8\", \"2001:db8::1\"]\n\
             topics = [\"chat\"]\n\
             max_message_age = \"5m\"\nmax_clock_skew = \"30s\"\n\
             store_quota = \"10GiB\"\nchunk_size = 1048576\n\
             role = \"auto\"\nlog_level = \"info,servant=debug\"\n"
        )
        .into_bytes(),
    );
    add(
        "config_toml",
        "invalid-unknown-key",
        b"conn_lo = 8\n".to_vec(),
    );
    add(
        "config_toml",
        "invalid-contradiction",
        b"conn_low = 64\nconn_high = 8\n".to_vec(),
    );
    add(
        "config_toml",
        "invalid-size",
        b"store_quota = \"18446744073709551615TiB\"\n".to_vec(),
    );
    add(
        "config_flags",
        "valid",
        format!(
            "--listen\n/ip4/127.0.0.1/tcp/4001,/ip4/127.0.0.1/udp/4001/quic-v1\n\
             --bootnode\n/ip4/192.0.2.1/tcp/4001/p2p/{peer}\n\
             --deny-cidr\n192.0.2.0/24\n--max-message-age\n10m\n--store-quota\n512MiB\n--no-upnp"
        )
        .into_bytes(),
    );
    add(
        "config_flags",
        "invalid-bootnode-without-peer",
        b"--bootnode\n/ip4/192.0.2.1/tcp/4001".to_vec(),
    );
    add(
        "config_flags",
        "invalid-duration",
        b"--max-clock-skew\nforever".to_vec(),
    );

    // API targets.
    for (name, target) in [
        ("valid-peer", peer.clone()),
        ("valid-addr", format!("/ip4/192.0.2.1/tcp/4001/p2p/{peer}")),
        (
            "valid-relayed",
            format!("/ip6/::ffff:10.0.0.1/tcp/1/p2p/{peer}/p2p-circuit"),
        ),
        ("valid-cidr", "10.0.0.0/8".to_string()),
        ("valid-ip", "::ffff:192.0.2.7".to_string()),
        ("valid-content-id", id.to_hex()),
        ("invalid-addr", "/ip4/999.0.0.1/tcp/1".to_string()),
    ] {
        add(
            "api_target",
            name,
            serde_json::to_vec(&TargetRequest { target }).unwrap_or_default(),
        );
    }
    add(
        "api_target",
        "raw-dns",
        b"/dns4/example.org/tcp/4001".to_vec(),
    );

    // AutoNAT v2 messages as a server sends them.
    let messages = [
        (
            "valid-dial-response",
            wire::Message {
                msg: Some(wire::Msg::DialResponse(wire::DialResponse {
                    status: wire::response_status::OK,
                    addr_idx: 0,
                    dial_status: wire::dial_status::OK,
                })),
            },
        ),
        (
            "valid-data-request",
            wire::Message {
                msg: Some(wire::Msg::DialDataRequest(wire::DialDataRequest {
                    addr_idx: 0,
                    num_bytes: 100_000,
                })),
            },
        ),
        (
            "valid-dial-request",
            wire::Message {
                msg: Some(wire::Msg::DialRequest(wire::DialRequest {
                    addrs: vec![vec![4, 127, 0, 0, 1, 6, 0x0f, 0xa1]],
                    nonce: u64::MAX,
                })),
            },
        ),
    ];
    for (name, message) in &messages {
        let mut out = Vec::new();
        block_on(wire::write(&mut out, message)).unwrap_or_else(|e| panic!("seed: {e}"));
        add("autonat_wire", name, out);
    }
    let mut out = Vec::new();
    block_on(wire::write(&mut out, &wire::DialBack { nonce: 42 }))
        .unwrap_or_else(|e| panic!("seed: {e}"));
    add("autonat_wire", "valid-dial-back", out);
    add(
        "autonat_wire",
        "invalid-4gib",
        vec![0x80, 0x80, 0x80, 0x80, 0x10],
    );
    add("autonat_wire", "invalid-long-varint", vec![0xff; 11]);
    seeds
}

/// A one-file manifest with three chunks, the last one short.
fn small_manifest() -> Manifest {
    let chunk_size = manifest::MIN_CHUNK_SIZE;
    Manifest {
        version: manifest::MANIFEST_VERSION,
        name: "report.pdf".into(),
        kind: Kind::File,
        chunk_size,
        entries: vec![Entry {
            path: String::new(),
            size: 2 * u64::from(chunk_size) + 5,
            chunks: (0u8..3).map(|i| Hash::of(&[i])).collect(),
        }],
    }
}

/// A directory manifest with nested and empty files.
fn small_dir() -> Manifest {
    let chunk_size = manifest::MIN_CHUNK_SIZE;
    let entry = |path: &str, size: u64| Entry {
        path: path.into(),
        size,
        chunks: (0..size.div_ceil(u64::from(chunk_size)))
            .map(|i| Hash::of(&i.to_le_bytes()))
            .collect(),
    };
    Manifest {
        version: manifest::MANIFEST_VERSION,
        name: "photos".into(),
        kind: Kind::Dir,
        chunk_size,
        entries: vec![
            entry("2026/a.jpg", 40_000),
            entry("2026/b.jpg", 0),
            entry("notes.txt", 17),
        ],
    }
}
