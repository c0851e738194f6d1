//! Drives the compose lab (`deploy/compose/`) for the multi-container tests: the same
//! `lab.sh` an operator uses, a project and state directory of the test's own, the
//! nodes' APIs reached from the host at their fixed lab addresses, and every
//! container's log kept when a test fails.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{Api, REQUEST_TIMEOUT};

/// The lab's nodes: compose service and the address the host reaches its API on.
pub const NODES: [(&str, &str); 8] = [
    ("bootnode", "172.29.0.10"),
    ("super1", "172.29.0.11"),
    ("super2", "172.29.0.12"),
    ("super3", "172.29.0.13"),
    ("peer-a1", "10.31.1.11"),
    ("peer-a2", "10.31.1.12"),
    ("peer-b1", "10.31.2.11"),
    ("peer-b2", "10.31.2.12"),
];

/// Prometheus's address in the lab.
pub const PROMETHEUS: &str = "http://172.29.0.90:9090";

/// A running compose lab, torn down (volumes included) when dropped.
pub struct ComposeLab {
    project: String,
    state: tempfile::TempDir,
    token: String,
    http: reqwest::Client,
    passed: bool,
}

fn lab_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/lab.sh")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{}", out.status, output_text(&out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the images (`lab.sh build`): base images from debootstrap where none exist,
/// then the top-level Dockerfile. Docker's layer cache makes a second build quick.
pub fn build_images() -> Result<()> {
    let out = Command::new("bash")
        .arg(lab_sh())
        .arg("build")
        .output()
        .context("run lab.sh build")?;
    if !out.status.success() {
        bail!("lab.sh build failed:\n{}", output_text(&out));
    }
    Ok(())
}

impl ComposeLab {
    /// Starts the lab under `project` (a stale one of that name is removed first).
    pub fn up(project: &str) -> Result<ComposeLab> {
        let state = tempfile::Builder::new()
            .prefix("servant-compose-")
            .tempdir()
            .context("state dir")?;
        let mut lab = ComposeLab {
            project: project.to_string(),
            state,
            token: String::new(),
            http: reqwest::Client::new(),
            passed: false,
        };
        // A lab left by an earlier, killed run holds the same fixed subnets.
        for stale in [project, "servant-lab"] {
            let _ = Command::new("docker-compose")
                .args(["-p", stale, "-f"])
                .arg(lab_sh().with_file_name("docker-compose.yml"))
                .args(["down", "-v", "--remove-orphans"])
                .env("SERVANT_API_TOKEN", "x")
                .env("BOOTNODE_ID", "x")
                .env("SUPER1_ID", "x")
                .output();
        }
        lab.lab(&["up"])?;
        let env = std::fs::read_to_string(lab.state.path().join("env"))?;
        lab.token = env
            .lines()
            .find_map(|l| l.strip_prefix("SERVANT_API_TOKEN="))
            .context("no token in the lab's env file")?
            .to_string();
        Ok(lab)
    }

    /// Runs `lab.sh ARGS` with this lab's project and state.
    pub fn lab(&self, args: &[&str]) -> Result<String> {
        run(Command::new("bash")
            .arg(lab_sh())
            .args(args)
            .env("COMPOSE_PROJECT_NAME", &self.project)
            .env("SERVANT_LAB_STATE", self.state.path()))
    }

    /// Runs a docker-compose command on this lab.
    pub fn compose(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["compose"];
        all.extend_from_slice(args);
        self.lab(&all)
    }

    /// The container of a service (compose v1 names it `<project>_<service>_1`).
    pub fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    /// A compose network's Docker name.
    pub fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }

    /// Runs a command in a service's container.
    pub fn exec(&self, service: &str, cmd: &[&str]) -> Result<String> {
        run(Command::new("docker")
            .arg("exec")
            .arg(self.container(service))
            .args(cmd))
    }

    /// The API of a node of [`NODES`].
    pub fn api(&self, service: &str) -> Api {
        let ip = NODES
            .iter()
            .find(|(name, _)| *name == service)
            .map(|(_, ip)| *ip)
            .unwrap_or_else(|| panic!("{service} is not a lab node"));
        Api::new(
            service,
            &format!("http://{ip}:5100"),
            Some(self.token.clone()),
            self.http.clone(),
        )
    }

    /// A Prometheus HTTP API query (`/api/v1/...`), its `data` field.
    pub async fn prometheus(&self, path: &str) -> Result<serde_json::Value> {
        #[derive(Deserialize)]
        struct Answer {
            status: String,
            data: serde_json::Value,
        }
        let answer: Answer = self
            .http
            .get(format!("{PROMETHEUS}{path}"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?
            .json()
            .await?;
        if answer.status != "success" {
            bail!("prometheus {path}: {}", answer.status);
        }
        Ok(answer.data)
    }

    /// The host PID of a service's main process (for a real SIGKILL).
    pub fn pid(&self, service: &str) -> Result<u32> {
        let out = run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{.State.Pid}}",
            &self.container(service),
        ]))?;
        out.trim()
            .parse()
            .with_context(|| format!("pid of {service}: {out}"))
    }

    /// Marks the test as passed: the lab's logs need not be kept.
    pub fn pass(&mut self) {
        self.passed = true;
    }

    fn keep_logs(&self) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("servant-compose-logs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        for (service, _) in
            NODES
                .iter()
                .chain(&[("router-a", ""), ("router-b", ""), ("prometheus", "")])
        {
            if let Ok(out) = Command::new("docker")
                .args(["logs", "--timestamps", &self.container(service)])
                .output()
            {
                let _ = std::fs::write(dir.join(format!("{service}.log")), output_text(&out));
            }
        }
        dir
    }
}

impl Drop for ComposeLab {
    fn drop(&mut self) {
        if !self.passed {
            let dir = self.keep_logs();
            eprintln!(
                "\n===== compose lab failed: every container's log is in {} =====",
                dir.display()
            );
            for (service, _) in NODES {
                let log = crate::tail(&dir.join(format!("{service}.log")), 15);
                eprintln!("----- {service} (last lines)\n{log}");
            }
        }
        let _ = self.lab(&["down"]);
    }
}
