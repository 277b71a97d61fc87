//! A real Prometheus (the Debian package's binary) on loopback for the planner tests: started with
//! a scrape config the test writes, ready-checked, stopped on drop. Included by path
//! (`#[path = "common/prometheus.rs"] mod prometheus_support;`) by the tests that need it.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `$TANDEM_PROMETHEUS`, else `prometheus` on the `PATH`.
pub fn prometheus_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANDEM_PROMETHEUS") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("prometheus"))
                .find(|candidate| candidate.is_file())
        })
        .expect(
            "the `prometheus` binary is needed: `make test` installs the Debian package \
             (apt-get install prometheus), or set TANDEM_PROMETHEUS to one",
        )
}

/// A free loopback port (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus process scraping every second, stopped on drop (SIGTERM, then SIGKILL after
/// five seconds). Its config and TSDB live in the directory it was started in; the caller owns
/// (and removes) that directory.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl Prometheus {
    /// Writes `<dir>/prometheus.yml` (a 1 s scrape interval and `scrape_configs`, YAML list
    /// items at column 0) and starts Prometheus on `port` with its TSDB in `<dir>/tsdb`.
    pub fn start(dir: &Path, scrape_configs: &str, port: u16) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{scrape_configs}"
            ),
        )
        .unwrap();
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Waits until `/-/ready` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let ready = format!("{}/-/ready", self.url);
        let deadline = Instant::now() + timeout;
        loop {
            if reqwest::get(&ready)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
