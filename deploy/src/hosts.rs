//! Hosts on one machine: each a network namespace with one interface, all joined by a bridge
//! that lives in a namespace of its own, so every address is a real non-loopback one and no
//! packet reaches the machine's own network. A host's link can be cut (its port on the bridge
//! goes down: packets vanish, as when a node drops off the network) and restored.
//!
//! Namespaces are named `ltPID-...` after the test process: a run that died leaves its own,
//! which the next run removes (those whose process is gone).

use std::process::Command;

/// The private subnet the hosts live on (RFC 1918, used nowhere on these machines).
const SUBNET: &str = "10.77.0";

pub struct Network {
    prefix: String,
    hosts: usize,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (iproute2)"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Network {
    /// `hosts` hosts at 10.77.0.1, 10.77.0.2, ...
    pub fn new(hosts: usize) -> Network {
        remove_stale();
        let prefix = format!("lt{}", std::process::id());
        let network = Network { prefix, hosts };
        let switch = network.switch();
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let host = network.namespace(i);
            let port = format!("port{i}");
            ip(&["netns", "add", &host]);
            ip(&["-n", &host, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &host,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &port, "up"]);
            let address = format!("{}/24", network.address(i));
            ip(&["-n", &host, "addr", "add", &address, "dev", "eth0"]);
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
        }
        network
    }

    fn switch(&self) -> String {
        format!("{}-switch", self.prefix)
    }

    /// Host `i`'s namespace.
    pub fn namespace(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// Host `i`'s address.
    pub fn address(&self, i: usize) -> String {
        format!("{SUBNET}.{}", i + 1)
    }

    /// `program` run on host `i`.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(i)])
            .arg(program);
        command
    }

    /// Cuts host `i` off the network: its port on the bridge goes down.
    pub fn cut(&self, i: usize) {
        self.set_port(i, "down");
    }

    /// Connects host `i` again.
    pub fn restore(&self, i: usize) {
        self.set_port(i, "up");
    }

    fn set_port(&self, i: usize, state: &str) {
        let port = format!("port{i}");
        ip(&["-n", &self.switch(), "link", "set", &port, state]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let names: Vec<String> = (0..self.hosts)
            .map(|i| self.namespace(i))
            .chain([self.switch()])
            .collect();
        for name in names {
            remove(&name);
        }
    }
}

/// Removes namespace `name`, ending what still runs in it.
fn remove(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// Removes the namespaces of test processes that are gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("lt")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove(name);
        }
    }
}
