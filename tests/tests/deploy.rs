//! Every config that `deploy/` ships is accepted by `servant run --print-config`, so a
//! misspelt key fails here rather than in a deployment.

use std::path::Path;

use servant_tests::run_cli;

#[test]
fn shipped_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let configs = ["deploy/servant.example.toml"];
    for config in configs {
        let path = root.join(config);
        let out = run_cli(
            &["run", "--config", path.to_str().unwrap(), "--print-config"],
            &[],
        );
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("checked: {config} is a valid config");
    }
}
