//! Command-line flags made from the parts' setting declarations
//! ([`nexus_core::settings`]): one `--flag` with its environment variable per
//! non-secret setting, the help line and default taken from the declaration.
//! Secrets get no flag (other users can read the process list): they come
//! from the environment or the state folder only.

use std::collections::{BTreeMap, HashSet};

use clap::{Arg, ArgMatches, Command};
use nexus_core::settings::{Kind, Setting};

/// Raw values given as flags or environment variables, by variable name.
pub type Given = BTreeMap<&'static str, String>;

/// Adds a flag for every non-secret setting of `lists`, once per name,
/// except those named in `skip` (the command sets them itself).
fn augment(mut cmd: Command, lists: &[&[&'static Setting]], skip: &[&str]) -> Command {
    let mut seen: HashSet<&str> = skip.iter().copied().collect();
    for s in lists.iter().flat_map(|l| l.iter()) {
        if s.is_secret() || !seen.insert(s.name) {
            continue;
        }
        let mut help = s.help.to_string();
        if let Some(d) = s.default {
            help.push_str(&format!(" [default: {d}]"));
        }
        let value_name = match s.kind {
            Kind::Number {
                unit: "seconds", ..
            } => "SECS".into(),
            Kind::Number { unit, .. } if !unit.is_empty() => unit.to_ascii_uppercase(),
            Kind::Number { .. } => "N".into(),
            Kind::Bool => "BOOL".into(),
            Kind::Text | Kind::Secret => "VALUE".into(),
        };
        cmd = cmd.arg(
            Arg::new(s.name)
                .long(s.flag())
                .env(s.name)
                .value_name(value_name)
                .help(help),
        );
    }
    cmd
}

fn given(m: &ArgMatches, lists: &[&[&'static Setting]], skip: &[&str]) -> Given {
    let mut out = Given::new();
    for s in lists.iter().flat_map(|l| l.iter()) {
        if s.is_secret() || skip.contains(&s.name) || out.contains_key(s.name) {
            continue;
        }
        if let Ok(Some(v)) = m.try_get_one::<String>(s.name) {
            out.insert(s.name, v.clone());
        }
    }
    out
}

/// A flattenable set of flags for the settings of some parts.
macro_rules! flags {
    ($(#[$meta:meta])* $name:ident: [$($list:expr),+] except [$($skip:expr),*]) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default)]
        pub struct $name(pub Given);

        impl clap::FromArgMatches for $name {
            fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
                Ok(Self(given(m, &[$($list),+], &[$($skip),*])))
            }
            fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
                self.0.extend(given(m, &[$($list),+], &[$($skip),*]));
                Ok(())
            }
        }

        impl clap::Args for $name {
            fn augment_args(cmd: Command) -> Command {
                augment(cmd, &[$($list),+], &[$($skip),*])
            }
            fn augment_args_for_update(cmd: Command) -> Command {
                augment(cmd, &[$($list),+], &[$($skip),*])
            }
        }
    };
}

flags!(
    /// The broker's settings.
    BrokerFlags: [nexus_broker::config::Settings::ALL] except []
);
flags!(
    /// The gateway's settings.
    GatewayFlags: [nexus_gateway::GatewaySettings::ALL] except []
);
flags!(
    /// The sidecar's settings.
    SidecarFlags: [nexus_sidecar::SidecarSettings::ALL] except []
);
flags!(
    /// Broker and gateway together (`nexus up`, which points the gateway
    /// at its own broker).
    UpFlags: [nexus_broker::config::Settings::ALL, nexus_gateway::GatewaySettings::ALL]
        except [nexus_gateway::config::BROKER_URL.name]
);

#[cfg(test)]
mod tests {
    use clap::{Args, FromArgMatches};

    use super::*;

    #[test]
    fn every_declared_setting_has_a_flag_and_secrets_have_none() {
        let cmd = UpFlags::augment_args(Command::new("t").no_binary_name(true));
        let m = cmd
            .clone()
            .try_get_matches_from([
                "--refresh-jitter-secs",
                "5",
                "--gateway-addr",
                "127.0.0.1:1",
            ])
            .unwrap();
        let got = UpFlags::from_arg_matches(&m).unwrap().0;
        assert_eq!(
            got.get("REFRESH_JITTER_SECS").map(String::as_str),
            Some("5")
        );
        assert_eq!(
            got.get("GATEWAY_ADDR").map(String::as_str),
            Some("127.0.0.1:1")
        );
        assert!(cmd
            .clone()
            .try_get_matches_from(["--api-key", "x"])
            .is_err());
        let flags: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        for s in nexus_broker::config::Settings::ALL
            .iter()
            .chain(nexus_gateway::GatewaySettings::ALL)
        {
            let expected = !s.is_secret() && s.name != "BROKER_URL";
            assert_eq!(flags.contains(&s.flag()), expected, "{}", s.name);
        }
    }
}
