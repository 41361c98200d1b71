//! systemd's unit and environment files, read as systemd reads them (the part of the syntax
//! Ladder's units use): sections, `Key=value` lines continued with a trailing backslash,
//! comments; `KEY=value` environment files; and a command line with its `${VAR}` variables and
//! `%` specifiers expanded.

use std::collections::BTreeMap;
use std::path::Path;

/// A unit file's settings, in order (a key may repeat, as `LoadCredential=` does).
pub struct Unit {
    settings: Vec<(String, String, String)>,
}

impl Unit {
    pub fn load(path: &Path) -> Unit {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut settings = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for line in text.lines() {
            let line = line.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(continued) = line.strip_suffix('\\') {
                pending.push_str(continued);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let whole = std::mem::take(&mut pending);
            if let Some(name) = whole.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                section = name.to_owned();
            } else if let Some((key, value)) = whole.split_once('=') {
                settings.push((
                    section.clone(),
                    key.trim().to_owned(),
                    value.trim().to_owned(),
                ));
            } else {
                panic!("{}: not a setting: {whole}", path.display());
            }
        }
        Unit { settings }
    }

    /// Every value of `key` in `section`, in order.
    pub fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.settings
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The value of `key` in `section` (the last, as systemd takes it).
    pub fn value(&self, section: &str, key: &str) -> Option<&str> {
        self.values(section, key).pop()
    }
}

/// An environment file's variables (`KEY=value`, comments and blank lines skipped).
pub fn environment_file(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';']))
        .map(|l| {
            let (key, value) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not KEY=value: {l}", path.display()));
            (
                key.trim().to_owned(),
                value.trim().trim_matches('"').to_owned(),
            )
        })
        .collect()
}

/// The words `ExecStart=`'s `command` runs as: split at whitespace, each `${VAR}` replaced by
/// its value in `environment` (one word, as systemd does) and each `%x` specifier by its value
/// in `specifiers` (`%%` is a percent sign). An undefined variable or specifier is an error:
/// systemd would run the command with an empty word where the unit meant a value.
pub fn command_line(
    command: &str,
    environment: &BTreeMap<String, String>,
    specifiers: &[(char, &str)],
) -> Result<Vec<String>, String> {
    command
        .split_whitespace()
        .map(|word| {
            let mut out = String::new();
            let mut rest = word;
            while let Some(at) = rest.find(['$', '%']) {
                out.push_str(&rest[..at]);
                let tail = &rest[at..];
                if let Some(variable) = tail.strip_prefix("${") {
                    let (name, after) = variable
                        .split_once('}')
                        .ok_or_else(|| format!("unclosed ${{ in {word}"))?;
                    let value = environment
                        .get(name)
                        .ok_or_else(|| format!("{name} is not defined (in {word})"))?;
                    out.push_str(value);
                    rest = after;
                } else if let Some(after) = tail.strip_prefix("%%") {
                    out.push('%');
                    rest = after;
                } else if let Some(specifier) = tail.strip_prefix('%') {
                    let letter = specifier
                        .chars()
                        .next()
                        .ok_or_else(|| format!("a lone % ends {word}"))?;
                    let value = specifiers
                        .iter()
                        .find(|(l, _)| *l == letter)
                        .map(|(_, v)| *v)
                        .ok_or_else(|| format!("specifier %{letter} has no value (in {word})"))?;
                    out.push_str(value);
                    rest = &specifier[letter.len_utf8()..];
                } else {
                    return Err(format!("only ${{VAR}} variables are expanded (in {word})"));
                }
            }
            out.push_str(rest);
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_expands_variables_and_specifiers_as_words() {
        let env = BTreeMap::from([("HOST".to_owned(), "10.0.0.1".to_owned())]);
        let words = command_line(
            "/bin/w --ring-host ${HOST} --device cuda:%i --name %H-gpu%i --pct 5%%",
            &env,
            &[('i', "3"), ('H', "node7")],
        )
        .unwrap();
        assert_eq!(
            words,
            [
                "/bin/w",
                "--ring-host",
                "10.0.0.1",
                "--device",
                "cuda:3",
                "--name",
                "node7-gpu3",
                "--pct",
                "5%"
            ]
        );
        assert!(
            command_line("x ${NOPE}", &env, &[])
                .unwrap_err()
                .contains("NOPE")
        );
        assert!(command_line("x %j", &env, &[]).unwrap_err().contains("%j"));
    }

    #[test]
    fn continued_lines_join_and_keys_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.service");
        std::fs::write(
            &path,
            "# comment\n[Service]\nLoadCredential=a:/x\nLoadCredential=b:/y\nExecStart=/bin/x \\\n    --flag 1 \\\n    --other\n[Install]\nWantedBy=multi-user.target\n",
        )
        .unwrap();
        let unit = Unit::load(&path);
        assert_eq!(unit.values("Service", "LoadCredential"), ["a:/x", "b:/y"]);
        assert_eq!(
            command_line(
                unit.value("Service", "ExecStart").unwrap(),
                &BTreeMap::new(),
                &[]
            )
            .unwrap(),
            ["/bin/x", "--flag", "1", "--other"]
        );
        assert_eq!(unit.value("Install", "WantedBy"), Some("multi-user.target"));
    }
}
