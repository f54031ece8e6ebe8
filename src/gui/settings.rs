//! What the app remembers between launches: the last run config (the same TOML the headless
//! mode reads, under `[config]`), the adapter and the open panel, in a small TOML file in the
//! user's config folder (`$XDG_CONFIG_HOME/explora/app.toml` or `~/.config/explora/app.toml`
//! on Linux, `~/Library/Application Support/explora/app.toml` on macOS,
//! `%APPDATA%\explora\config\app.toml` on Windows; `EXPLORA_APP_SETTINGS` overrides the path). A file that does
//! not parse is ignored (the built-in defaults are used).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::train::PretrainConfig;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The open panel.
    pub tab: Option<String>,
    /// The preset the plan was edited from.
    pub preset: Option<String>,
    /// Where the config was last saved to or loaded from.
    pub config_file: Option<PathBuf>,
    /// The run config as it was when the app closed.
    pub config: Option<PretrainConfig>,
}

/// Where the settings live: `EXPLORA_APP_SETTINGS`, else the platform's config folder for
/// explora (the `directories` crate).
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EXPLORA_APP_SETTINGS") {
        return Some(PathBuf::from(p));
    }
    directories::ProjectDirs::from("", "", "explora").map(|dirs| dirs.config_dir().join("app.toml"))
}

impl Settings {
    pub fn load() -> Self {
        path().map(|p| Self::load_from(&p)).unwrap_or_default()
    }

    pub fn load_from(path: &std::path::Path) -> Self {
        std::fs::read_to_string(path).ok().and_then(|text| toml::from_str(&text).ok()).unwrap_or_default()
    }

    pub fn save(&self) -> anyhow::Result<()> {
        match path() {
            Some(p) => self.save_to(&p),
            None => Ok(()),
        }
    }

    pub fn save_to(&self, path: &std::path::Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        crate::checkpoint::atomic_write(path, toml::to_string_pretty(self)?.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_bad_files_fall_back_to_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/app.toml");
        let mut config = PretrainConfig::builtin_software();
        config.run.steps = 7;
        config.plan.lora_rank = Some(4);
        let s = Settings { tab: Some("Adaptation".into()), preset: Some("lora".into()), config_file: None, config: Some(config) };
        s.save_to(&path).unwrap();
        assert_eq!(Settings::load_from(&path), s);
        std::fs::write(&path, "[config]\nnot_a_field = 1\n").unwrap();
        assert_eq!(Settings::load_from(&path), Settings::default());
    }
}
