//! The parameters of one gossip benchmark run, shared by the parent and both children.

use serde::{Deserialize, Serialize};

/// What to run: the network's size and shape and the load put on it.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct Params {
    /// Nodes in each network.
    #[arg(long, default_value_t = 50)]
    pub nodes: usize,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Nodes that publish, spread evenly over the node indices; they take turns.
    #[arg(long, default_value_t = 5)]
    pub publishers: usize,
    /// Length of the load window in seconds.
    #[arg(long, default_value_t = 20)]
    pub secs: u64,
    /// Body size of each message in bytes (Servant wraps it in its envelope; the
    /// baseline publishes the same envelope bytes).
    #[arg(long, default_value_t = 1024)]
    pub body_bytes: usize,
    /// Fewest peers a node gets in the planned topology.
    #[arg(long, default_value_t = 6)]
    pub min_degree: usize,
    /// Most peers a node gets in the planned topology.
    #[arg(long, default_value_t = 8)]
    pub max_degree: usize,
    /// Servant's low watermark of connected peers.
    #[arg(long, default_value_t = 6)]
    pub conn_low: u32,
    /// Servant's high watermark of connected peers.
    #[arg(long, default_value_t = 8)]
    pub conn_high: u32,
    /// Seconds the settled network idles before memory is measured.
    #[arg(long, default_value_t = 5)]
    pub idle_secs: u64,
    /// Most seconds to wait for meshes to form and connections to hold still; the
    /// run goes on (marked unsettled) after that.
    #[arg(long, default_value_t = 120)]
    pub settle_timeout_secs: u64,
    /// Most seconds to wait after the load for late deliveries.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
    /// Before each implementation runs, wait up to this many seconds for other
    /// processes to leave the CPU (a shared machine skews latency); then run anyway.
    #[arg(long, default_value_t = 120)]
    pub quiet_wait_secs: u64,
    /// Cores other processes may keep busy for the machine to count as quiet.
    #[arg(long, default_value_t = 0.25)]
    pub quiet_cores: f64,
    /// Seed of the planned topology.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The gossipsub topic.
    #[arg(long, default_value = "bench")]
    pub topic: String,
}

impl Params {
    /// Messages in the load window.
    pub fn messages(&self) -> u64 {
        u64::from(self.rate) * self.secs
    }

    /// Refuses combinations that cannot run.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes >= 2, "--nodes must be at least 2");
        anyhow::ensure!(
            (1..=self.nodes).contains(&self.publishers),
            "--publishers must be between 1 and --nodes"
        );
        anyhow::ensure!(self.rate >= 1, "--rate must be at least 1");
        anyhow::ensure!(self.secs >= 1, "--secs must be at least 1");
        anyhow::ensure!(
            self.body_bytes >= crate::load::SEQ_DIGITS,
            "--body-bytes must be at least {}",
            crate::load::SEQ_DIGITS
        );
        anyhow::ensure!(
            1 <= self.min_degree && self.min_degree <= self.max_degree,
            "need 1 <= --min-degree <= --max-degree"
        );
        anyhow::ensure!(
            self.max_degree < self.nodes,
            "--max-degree must be below --nodes"
        );
        anyhow::ensure!(
            1 <= self.conn_low && self.conn_low <= self.conn_high,
            "need 1 <= --conn-low <= --conn-high"
        );
        Ok(())
    }
}
