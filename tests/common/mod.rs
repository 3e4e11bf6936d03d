//! Helpers shared by the integration tests: the in-process [`Server`],
//! fixture files, and (in [`client`]) the raw ZEO client and bystander of
//! the wire and hostile-input tests. Each test crate uses a part of this
//! module, hence the `dead_code` allowance (which covers `client` too).
#![allow(dead_code)]

pub mod client;

use std::path::PathBuf;

/// The default configuration without its addresses (each test binds
/// 127.0.0.1:0 itself).
pub fn cfg() -> zeotemp::config::Config {
    zeotemp::config::Config {
        addresses: vec![],
        ..zeotemp::config::Config::default()
    }
}

/// `fixtures/<folder>` of this repository.
pub fn fixtures_dir(folder: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(folder)
}

/// Bytes from the hex digits the fixture files carry.
pub fn hex_decode(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The real server, in process, on 127.0.0.1:0; stopped by [`Server::stop`].
pub struct Server {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(cfg: zeotemp::config::Config) -> Server {
        let listeners = zeotemp::server::bind(&["127.0.0.1:0".to_string()])
            .await
            .unwrap();
        let addr = match &listeners[0] {
            zeotemp::server::Listener::Tcp(l) => l.local_addr().unwrap(),
            _ => unreachable!(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(zeotemp::server::run(listeners, cfg, async {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            task,
        }
    }

    /// Shuts the server down and waits (10 s at most) for it to finish.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(std::time::Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
