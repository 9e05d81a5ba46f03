//! Settings of a command from three places, as operators expect: a TOML file
//! (`--config PATH`), then environment variables `RINGCAST_*`, then flags, each
//! overriding the one before. A file's keys and the variables' names are the flags' long
//! names: `--max-rate` is `max_rate` in the file and `RINGCAST_MAX_RATE` in the
//! environment.
//!
//! Everything becomes one argument list for clap, in that order, so that every value is
//! parsed and checked by the same code as a flag (the command must let a later flag
//! override an earlier one: `args_override_self`). A list flag (one that may be
//! repeated) is taken whole from the highest place that sets it. An unknown key, a value
//! of the wrong type, or one the flag refuses, is an error that names the key and where
//! it came from; nothing falls back to a default.

use std::collections::BTreeMap;
use std::path::Path;

use clap::ArgAction;

/// The flag that names the file; it is never read from the file itself.
pub const CONFIG_FLAG: &str = "config";

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The `--config` file.
    File,
    /// This environment variable.
    Env(String),
    /// A flag on the command line.
    Flag,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File => f.write_str("config file"),
            Source::Env(var) => write!(f, "environment {var}"),
            Source::Flag => f.write_str("flag"),
        }
    }
}

/// The merged argument list, and where each setting in it came from (by long name).
#[derive(Debug, Clone, Default)]
pub struct Layered {
    /// The arguments for clap, after the command's name: the file's, the environment's,
    /// then the flags'.
    pub args: Vec<String>,
    /// Where each setting that is not a default came from, by long name.
    pub sources: BTreeMap<String, Source>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Switch,
    List,
    Value,
}

/// The settable flags of `cmd`: long name and kind.
fn flags(cmd: &clap::Command) -> BTreeMap<String, Kind> {
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            if long == CONFIG_FLAG || long == "help" || long == "version" {
                return None;
            }
            let kind = match a.get_action() {
                ArgAction::SetTrue | ArgAction::SetFalse => Kind::Switch,
                ArgAction::Append => Kind::List,
                _ => Kind::Value,
            };
            Some((long.to_string(), kind))
        })
        .collect()
}

/// The long names `argv` sets (`--name value` or `--name=value`).
fn given(argv: &[String]) -> Vec<String> {
    argv.iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

/// One setting as flags: `name` of `kind` set to the strings `values` (a switch: one
/// of "true"/"false").
fn as_args(name: &str, kind: Kind, values: &[String], out: &mut Vec<String>) {
    match kind {
        Kind::Switch => {
            if values.first().is_some_and(|v| v == "true") {
                out.push(format!("--{name}"));
            }
        }
        Kind::List | Kind::Value => {
            for v in values {
                out.push(format!("--{name}={v}"));
            }
        }
    }
}

/// A TOML value as the strings a flag takes.
fn toml_values(key: &str, kind: Kind, v: &toml::Value) -> Result<Vec<String>, String> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "key `{key}`: expected a string or a number, found {}",
            other.type_str()
        )),
    };
    match (kind, v) {
        (Kind::Switch, toml::Value::Boolean(b)) => Ok(vec![b.to_string()]),
        (Kind::Switch, other) => Err(format!(
            "key `{key}`: expected true or false, found {}",
            other.type_str()
        )),
        (Kind::List, toml::Value::Array(items)) => items.iter().map(scalar).collect(),
        (Kind::List, v) => Ok(vec![scalar(v)?]),
        (Kind::Value, v) => Ok(vec![scalar(v)?]),
    }
}

/// An environment value as the strings a flag takes: a switch is `true`/`1`/`on` or
/// `false`/`0`/`off`, a list is comma-separated.
fn env_values(var: &str, kind: Kind, v: &str) -> Result<Vec<String>, String> {
    match kind {
        Kind::Switch => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "on" | "yes" => Ok(vec!["true".into()]),
            "false" | "0" | "off" | "no" | "" => Ok(vec!["false".into()]),
            _ => Err(format!("{var}={v:?}: expected true or false")),
        },
        Kind::List => Ok(v
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()),
        Kind::Value => Ok(vec![v.to_string()]),
    }
}

/// Checks `args` (the settings of one place) with the command's own parsers; an error
/// names the place.
fn check(cmd: &clap::Command, args: &[String], place: &str) -> Result<(), String> {
    let mut argv = vec![cmd.get_name().to_string()];
    argv.extend_from_slice(args);
    cmd.clone().try_get_matches_from(argv).map(drop).map_err(|e| {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        format!("{place}: {}", first.trim_start_matches("error: "))
    })
}

/// Merges the settings of `cmd` from the TOML `file` (path and text), the environment
/// `env` (`RINGCAST_*` variables; others are ignored) and the flags `argv` (the
/// arguments after the command's name), in that order of precedence, lowest first.
pub fn layered(
    cmd: &clap::Command,
    file: Option<(&Path, &str)>,
    env: &[(String, String)],
    argv: &[String],
) -> Result<Layered, String> {
    let flags = flags(cmd);
    let on_cli = given(argv);
    let mut out = Layered::default();
    let mut from_env = Vec::new();
    let mut env_args = Vec::new();
    for (name, kind) in &flags {
        let var = format!("RINGCAST_{}", name.replace('-', "_").to_ascii_uppercase());
        let Some((_, value)) = env.iter().find(|(k, _)| *k == var) else {
            continue;
        };
        if on_cli.contains(name) {
            continue;
        }
        let values = env_values(&var, *kind, value)?;
        let mut args = Vec::new();
        as_args(name, *kind, &values, &mut args);
        check(cmd, &args, &format!("environment {var}"))?;
        env_args.extend(args);
        from_env.push(name.clone());
        out.sources.insert(name.clone(), Source::Env(var));
    }
    if let Some((path, text)) = file {
        let place = format!("config file {}", path.display());
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("{place}: {e}"))?;
        let mut file_args = Vec::new();
        for (key, value) in &table {
            let name = key.replace('_', "-");
            let Some(kind) = flags.get(&name) else {
                let known: Vec<_> = flags.keys().map(|k| k.replace('-', "_")).collect();
                return Err(format!(
                    "{place}: unknown key `{key}` (the keys are: {})",
                    known.join(", ")
                ));
            };
            let values = toml_values(key, *kind, value).map_err(|e| format!("{place}: {e}"))?;
            let mut args = Vec::new();
            as_args(&name, *kind, &values, &mut args);
            check(cmd, &args, &format!("{place}, key `{key}`"))?;
            // A list comes whole from the highest place that sets it.
            if *kind == Kind::List && (on_cli.contains(&name) || from_env.contains(&name)) {
                continue;
            }
            if !on_cli.contains(&name) && !from_env.contains(&name) {
                out.sources.insert(name.clone(), Source::File);
            }
            file_args.extend(args);
        }
        out.args.extend(file_args);
    }
    out.args.extend(env_args);
    for name in &on_cli {
        if flags.contains_key(name) {
            out.sources.insert(name.clone(), Source::Flag);
        }
    }
    out.args.extend_from_slice(argv);
    Ok(out)
}

/// `--config PATH` (or `--config=PATH`) in `argv`, if given.
pub fn config_path(argv: &[String]) -> Option<String> {
    let i = argv
        .iter()
        .position(|a| a == "--config" || a.starts_with("--config="))?;
    match argv[i].strip_prefix("--config=") {
        Some(p) => Some(p.to_string()),
        None => argv.get(i + 1).cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cmd() -> Command {
        Command::new("serve")
            .args_override_self(true)
            .arg(Arg::new("config").long("config"))
            .arg(
                Arg::new("max-rate")
                    .long("max-rate")
                    .value_parser(clap::value_parser!(u32)),
            )
            .arg(Arg::new("listen").long("listen"))
            .arg(Arg::new("dev").long("dev").action(ArgAction::SetTrue))
            .arg(
                Arg::new("allowed-origin")
                    .long("allowed-origin")
                    .action(ArgAction::Append),
            )
    }

    fn parse(l: &Layered) -> clap::ArgMatches {
        let mut argv = vec!["serve".to_string()];
        argv.extend(l.args.clone());
        cmd().try_get_matches_from(argv).unwrap()
    }

    const FILE: &str = "max_rate = 100\nlisten = \"0.0.0.0:4000\"\ndev = true\nallowed_origin = [\"//a.example\", \"//b.example\"]\n";

    #[test]
    fn flags_override_the_environment_which_overrides_the_file() {
        let path = Path::new("ringcast.toml");
        let env = vec![
            ("RINGCAST_MAX_RATE".to_string(), "200".to_string()),
            ("RINGCAST_LOG".to_string(), "debug".to_string()),
        ];
        let l = layered(
            &cmd(),
            Some((path, FILE)),
            &env,
            &["--listen".into(), "127.0.0.1:1".into()],
        )
        .unwrap();
        let m = parse(&l);
        assert_eq!(m.get_one::<u32>("max-rate"), Some(&200));
        assert_eq!(m.get_one::<String>("listen").unwrap(), "127.0.0.1:1");
        assert!(m.get_flag("dev"));
        let origins: Vec<_> = m.get_many::<String>("allowed-origin").unwrap().cloned().collect();
        assert_eq!(origins, ["//a.example", "//b.example"]);
        assert_eq!(l.sources["max-rate"], Source::Env("RINGCAST_MAX_RATE".into()));
        assert_eq!(l.sources["listen"], Source::Flag);
        assert_eq!(l.sources["dev"], Source::File);
        // A list given higher up replaces the file's whole.
        let l = layered(
            &cmd(),
            Some((path, FILE)),
            &[],
            &["--allowed-origin".into(), "//c.example".into()],
        )
        .unwrap();
        let origins: Vec<_> = parse(&l)
            .get_many::<String>("allowed-origin")
            .unwrap()
            .cloned()
            .collect();
        assert_eq!(origins, ["//c.example"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_that_name_them() {
        let path = Path::new("x.toml");
        let e = layered(&cmd(), Some((path, "max_rates = 5\n")), &[], &[]).unwrap_err();
        assert!(
            e.contains("unknown key `max_rates`") && e.contains("max_rate"),
            "{e}"
        );
        let e = layered(&cmd(), Some((path, "max_rate = \"fast\"\n")), &[], &[]).unwrap_err();
        assert!(e.contains("key `max_rate`") && e.contains("fast"), "{e}");
        let e = layered(&cmd(), Some((path, "dev = \"yes\"\n")), &[], &[]).unwrap_err();
        assert!(e.contains("key `dev`: expected true or false"), "{e}");
        let e = layered(&cmd(), Some((path, "max_rate = \n")), &[], &[]).unwrap_err();
        assert!(e.starts_with("config file x.toml:"), "{e}");
        let env = vec![("RINGCAST_MAX_RATE".to_string(), "-1".to_string())];
        let e = layered(&cmd(), None, &env, &[]).unwrap_err();
        assert!(e.contains("RINGCAST_MAX_RATE"), "{e}");
    }

    #[test]
    fn the_config_path_is_found_in_either_spelling() {
        assert_eq!(
            config_path(&["--config".into(), "a.toml".into()]).as_deref(),
            Some("a.toml")
        );
        assert_eq!(
            config_path(&["--dev".into(), "--config=b.toml".into()]).as_deref(),
            Some("b.toml")
        );
        assert_eq!(config_path(&["--dev".into()]), None);
    }
}
