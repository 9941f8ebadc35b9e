//! Settings from a TOML file, the environment and flags, alike for every service: an operator
//! keeps a file per machine, overrides a setting for one run with a flag, and sees what a
//! service will really use with `--print-config`.
//!
//! Precedence: flags, then `SHARDSWARM_<SERVICE>_<FLAG>` variables (and the shared
//! `SHARDSWARM_TOKEN`), then the file given by `--config`, then the defaults. The file's keys
//! are the flags' long names (`min_nodes` or `min-nodes`); an unknown key is an error naming it.
//! The file is applied by handing its settings to clap as flags the command line did not set,
//! so a file's value is parsed and checked exactly as the same flag would be.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};

const CONFIG: &str = "config";
const PRINT_CONFIG: &str = "print_config";

/// Why settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line (or a value from the environment or the file) is wrong; clap's own
    /// error, which prints usage.
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error("config file {}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

/// What a command line asks for.
pub enum Parsed<C> {
    /// Run with these settings.
    Run(C),
    /// `--print-config`: this TOML, then exit.
    Print(String),
}

/// The service's command with `--config FILE`, `--print-config`, and an environment variable
/// `SHARDSWARM_<SERVICE>_<FLAG>` for every flag that has none yet.
pub fn command<C: CommandFactory>(service: &str) -> Command {
    let prefix = format!("SHARDSWARM_{}_", service.to_uppercase());
    let env_name = |id: &str| format!("{prefix}{}", id.to_uppercase());
    C::command()
        .mut_args(|a| {
            if a.get_env().is_none() && a.get_long().is_some() {
                let name = env_name(a.get_id().as_str());
                a.env(name)
            } else {
                a
            }
        })
        .arg(
            Arg::new(CONFIG)
                .long("config")
                .value_name("FILE")
                .env(env_name(CONFIG))
                .value_parser(clap::value_parser!(PathBuf))
                .help("Read settings from this TOML file (keys: the flags' long names, e.g. `min_nodes = 4`); flags and environment variables win over it"),
        )
        .arg(
            Arg::new(PRINT_CONFIG)
                .long("print-config")
                .action(ArgAction::SetTrue)
                .help("Print the settings this command line gives (defaults, file, environment, flags) as TOML, secrets left out, and exit"),
        )
}

/// Parse this process's command line for `service` (`seeder`, `coordinator`, `node`); like
/// clap's `parse`, print usage and exit on errors, and print and exit for `--print-config`.
pub fn parse<C: CommandFactory + FromArgMatches>(service: &str) -> C {
    match try_parse_from::<C>(service, std::env::args_os()) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Print(toml)) => {
            print!("{toml}");
            std::process::exit(0)
        }
        Err(ConfigError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
    }
}

/// [`parse`] for a given command line (the environment is the process's).
pub fn try_parse_from<C: CommandFactory + FromArgMatches>(
    service: &str,
    argv: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<Parsed<C>, ConfigError> {
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = command::<C>(service);
    // A first, lenient pass: which file, and which settings the command line and the
    // environment already give (a required flag may come from the file).
    let first = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)?;
    let mut all = argv.clone();
    if let (Some(path), None) = (first.get_one::<PathBuf>(CONFIG), first.subcommand()) {
        // The program name, the file's settings, then the command line as given.
        all.truncate(1);
        all.extend(file_args(&cmd, &first, path)?);
        all.extend(argv.into_iter().skip(1));
    }
    let matches = cmd.clone().try_get_matches_from(all)?;
    if matches.get_flag(PRINT_CONFIG) {
        return Ok(Parsed::Print(render(&cmd, &matches)));
    }
    Ok(Parsed::Run(C::from_arg_matches(&matches)?))
}

/// The settings a command can take from a file: its long flags, less `--config` itself.
fn settable(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| {
        a.get_long().is_some() && ![CONFIG, PRINT_CONFIG].contains(&a.get_id().as_str())
    })
}

/// The file's settings as flags, for those the command line and environment leave unset.
fn file_args(cmd: &Command, given: &ArgMatches, path: &Path) -> Result<Vec<OsString>, ConfigError> {
    let fail = |message: String| ConfigError::File {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(e.to_string()))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let Some(arg) = settable(cmd).find(|a| a.get_id() == id.as_str()) else {
            let known: Vec<&str> = settable(cmd)
                .filter(|a| !a.is_hide_set())
                .map(|a| a.get_id().as_str())
                .collect();
            return Err(fail(format!(
                "unknown key `{key}` (known: {})",
                known.join(", ")
            )));
        };
        if !matches!(
            given.value_source(&id),
            None | Some(ValueSource::DefaultValue)
        ) {
            continue; // a flag or the environment sets it
        }
        let long = arg.get_long().expect("settable args are long flags");
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(fail(format!(
                        "`{key}` is a {}: give a string, number or boolean",
                        other.type_str()
                    )))
                }
            };
            if matches!(arg.get_action(), ArgAction::SetTrue) {
                match v {
                    toml::Value::Boolean(true) => out.push(format!("--{long}").into()),
                    toml::Value::Boolean(false) => {}
                    _ => return Err(fail(format!("`{key}` must be true or false"))),
                }
            } else {
                out.push(format!("--{long}={text}").into());
            }
        }
    }
    Ok(out)
}

/// The effective settings as TOML that `--config` reads back to the same settings. Secrets
/// (the args whose environment values are hidden: tokens, API keys) are only said to be set.
fn render(cmd: &Command, m: &ArgMatches) -> String {
    let mut out = format!(
        "# {} settings: flags > environment > --config file > defaults\n",
        cmd.get_name()
    );
    for arg in settable(cmd).filter(|a| !a.is_hide_set()) {
        let id = arg.get_id().as_str();
        let raw: Vec<String> = m
            .get_raw(id)
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if raw.is_empty() {
            let _ = writeln!(out, "# {id} = (unset)");
        } else if arg.is_hide_env_values_set() {
            let _ = writeln!(out, "# {id} = (set, not shown)");
        } else if matches!(arg.get_action(), ArgAction::Append) {
            let items: Vec<String> = raw.iter().map(|v| typed(v).to_string()).collect();
            let _ = writeln!(out, "{id} = [{}]", items.join(", "));
        } else {
            let _ = writeln!(out, "{id} = {}", typed(&raw[0]));
        }
    }
    out
}

/// A raw value as the TOML value that reads back to the same text: a number or boolean when
/// it is one exactly, else a string.
fn typed(raw: &str) -> toml::Value {
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(i) = raw.parse::<i64>() {
        if i.to_string() == raw {
            return toml::Value::Integer(i);
        }
    }
    if let Ok(f) = raw.parse::<f64>() {
        if f.is_finite() && f.to_string() == raw {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service of its own, so no real variable applies.
    #[derive(Debug, clap::Parser)]
    struct Demo {
        #[arg(long, default_value_t = 4)]
        min_nodes: usize,
        #[arg(long)]
        name: String,
        #[arg(long)]
        fast: bool,
        #[arg(long, value_delimiter = ',', hide_env_values = true)]
        key: Vec<String>,
        #[arg(long, default_value_t = 0.01)]
        fraction: f64,
    }

    const SERVICE: &str = "demo_unit_test";

    fn parse(args: &[&str]) -> Result<Parsed<Demo>, ConfigError> {
        try_parse_from::<Demo>(SERVICE, std::iter::once("demo").chain(args.iter().copied()))
    }

    fn run(args: &[&str]) -> Demo {
        match parse(args) {
            Ok(Parsed::Run(d)) => d,
            Ok(Parsed::Print(t)) => panic!("printed {t}"),
            Err(e) => panic!("{e}"),
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let f = file("min-nodes = 6\nname = \"from-file\"\nfast = true\nkey = [\"a\", \"b\"]\n");
        let path = f.path().to_str().unwrap();
        let d = run(&["--config", path]);
        assert_eq!(
            (d.min_nodes, d.name.as_str(), d.fast),
            (6, "from-file", true)
        );
        assert_eq!(d.key, ["a", "b"]);
        let d = run(&["--config", path, "--min-nodes", "9", "--name", "flag"]);
        assert_eq!((d.min_nodes, d.name.as_str()), (9, "flag"));
        assert_eq!(run(&["--name", "x"]).min_nodes, 4);
    }

    #[test]
    fn unknown_keys_and_wrong_values_are_named() {
        let f = file("name = \"x\"\nmin_nodez = 3\n");
        let e = parse(&["--config", f.path().to_str().unwrap()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("unknown key `min_nodez`"), "{e}");
        let f = file("name = \"x\"\nmin_nodes = \"many\"\n");
        let e = parse(&["--config", f.path().to_str().unwrap()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("many"), "{e}");
        let f = file("name = [x\n");
        let e = parse(&["--config", f.path().to_str().unwrap()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("config file"), "{e}");
    }

    #[test]
    fn printed_settings_read_back_the_same_and_hide_secrets() {
        let Ok(Parsed::Print(printed)) =
            parse(&["--name", "n 1", "--key", "secret", "--print-config"])
        else {
            panic!("no print")
        };
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("# key = (set, not shown)"), "{printed}");
        assert!(printed.contains("fraction = 0.01"), "{printed}");
        let f = file(&printed);
        let Ok(Parsed::Print(again)) =
            parse(&["--config", f.path().to_str().unwrap(), "--print-config"])
        else {
            panic!("no print")
        };
        assert_eq!(
            printed.replace("# key = (set, not shown)", "# key = (unset)"),
            again
        );
    }
}
