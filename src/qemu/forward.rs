//! A port forward from the host to the guest, and the `hostfwd` rule text
//! QEMU's user network takes for it (on its command line and over HMP).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub udp: bool,
    pub host_addr: String,
    pub host_port: u16,
    pub guest_port: u16,
}

impl Forward {
    pub fn proto(&self) -> &'static str {
        if self.udp {
            "udp"
        } else {
            "tcp"
        }
    }

    /// The host end as `hostfwd` rules name it: `tcp:ADDR:PORT` (what HMP
    /// `hostfwd_remove` takes).
    pub fn host_end(&self) -> String {
        format!("{}:{}:{}", self.proto(), self.host_addr, self.host_port)
    }

    /// The `hostfwd` rule text shared by `-netdev` and HMP `hostfwd_add`.
    pub fn rule(&self) -> String {
        format!("{}-:{}", self.host_end(), self.guest_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_and_the_host_end_name_the_protocol() {
        let f = Forward { udp: true, host_addr: "127.0.0.1".into(), host_port: 5353, guest_port: 53 };
        assert_eq!(f.rule(), "udp:127.0.0.1:5353-:53");
        assert_eq!(f.host_end(), "udp:127.0.0.1:5353");
        assert_eq!(Forward { udp: false, ..f }.proto(), "tcp");
    }
}
