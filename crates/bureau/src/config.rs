//! The sections every bureau's configuration has, declared once: [`bureau_config!`] writes them
//! into each service's configuration type next to the service's own sections (the file format
//! stays flat: `[server]`, `[database]`, ..., then `[station]` or `[signing]`), and
//! [`Sections::validate`] checks them the same way for every bureau.
use yidi_grpc::{server_config::ServerConfig, tls::TlsConfig};
use yidi_idempotency::IdempotencyConfig;
use yidi_runtime::{
    clock::{Clock, ClockConfig},
    config::{ConfigError, DatabaseConfig, DirectoryConfig},
    telemetry::LogConfig,
};

/// The shared sections, borrowed from a bureau's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    pub server: &'a ServerConfig,
    pub database: &'a DatabaseConfig,
    pub directory: &'a DirectoryConfig,
    pub clock: &'a ClockConfig,
    pub log: &'a LogConfig,
    pub tls: &'a TlsConfig,
    pub idempotency: &'a IdempotencyConfig,
}

impl Sections<'_> {
    /// Checks what needs no directory or database; the first fault names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.bureau_id.trim().is_empty() {
            return Err(ConfigError::key("server.bureau_id", "must not be empty"));
        }
        self.server.limits()?;
        if self.database.url.trim().is_empty() {
            return Err(ConfigError::key("database.url", "must not be empty"));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::key("database.max_connections", "must be at least 1"));
        }
        if self.directory.path.as_os_str().is_empty() {
            return Err(ConfigError::key("directory.path", "must not be empty"));
        }
        Clock::from_config(self.clock).map_err(|message| ConfigError::key("clock", message))?;
        self.tls.validate()?;
        self.idempotency.validate()
    }
}

/// A bureau's configuration: it has the shared sections ([`bureau_config!`] implements this).
pub trait BureauConfig {
    fn sections(&self) -> Sections<'_>;
}

/// Declares a bureau's configuration type: the shared sections (`server`, `database`,
/// `directory`, `clock`, `log`, `tls`, `idempotency`), then the fields given, with
/// `deny_unknown_fields`, and implements [`BureauConfig`].
#[macro_export]
macro_rules! bureau_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// `[server]`: this bureau's id in the directory, where it listens, its load limits.
            pub server: $crate::config::reexport::ServerConfig,
            /// `[database]`: the bureau's own database.
            pub database: $crate::config::reexport::DatabaseConfig,
            /// `[directory]`: the directory of bureaus and how often it is re-read.
            pub directory: $crate::config::reexport::DirectoryConfig,
            /// `[clock]`: a fixed or offset clock for demos and tests.
            #[serde(default)]
            pub clock: $crate::config::reexport::ClockConfig,
            /// `[log]`: log format and the OpenTelemetry exporter.
            #[serde(default)]
            pub log: $crate::config::reexport::LogConfig,
            /// `[tls]`: mutual TLS files, or `plaintext = true`; neither fails start-up.
            #[serde(default)]
            pub tls: $crate::config::reexport::TlsConfig,
            /// `[idempotency]`: how long answers to repeated mutating calls are kept.
            #[serde(default)]
            pub idempotency: $crate::config::reexport::IdempotencyConfig,
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $crate::config::BureauConfig for $name {
            fn sections(&self) -> $crate::Sections<'_> {
                $crate::Sections {
                    server: &self.server,
                    database: &self.database,
                    directory: &self.directory,
                    clock: &self.clock,
                    log: &self.log,
                    tls: &self.tls,
                    idempotency: &self.idempotency,
                }
            }
        }
    };
}

/// The section types [`bureau_config!`] names, so that a service needs no import for them.
#[doc(hidden)]
pub mod reexport {
    pub use yidi_grpc::{server_config::ServerConfig, tls::TlsConfig};
    pub use yidi_idempotency::IdempotencyConfig;
    pub use yidi_runtime::{
        clock::ClockConfig,
        config::{DatabaseConfig, DirectoryConfig},
        telemetry::LogConfig,
    };
}

#[cfg(test)]
mod tests {
    crate::bureau_config! {
        /// Only the shared sections.
        pub struct OnlyShared {}
    }

    use crate::config::BureauConfig;

    #[test]
    fn a_bad_value_names_its_key() {
        let settings = config::Config::builder()
            .add_source(config::File::from_str(
                "[server]\nbureau_id = \"x\"\nlisten = \"not an address\"\n[database]\nurl = \"sqlite::memory:\"\n[directory]\npath = \"d.toml\"\n",
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap();
        let error = settings.try_deserialize::<OnlyShared>().unwrap_err().to_string();
        assert!(error.contains("server.listen"), "{error}");
    }

    #[test]
    fn the_shared_sections_are_checked_once_for_every_bureau() {
        let settings = config::Config::builder()
            .add_source(config::File::from_str(
                "[server]\nbureau_id = \" \"\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite::memory:\"\n[directory]\npath = \"d.toml\"\n[tls]\nplaintext = true\n",
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap();
        let mut config = settings.try_deserialize::<OnlyShared>().unwrap();
        let error = config.sections().validate().unwrap_err().to_string();
        assert!(error.contains("server.bureau_id"), "{error}");
        config.server.bureau_id = "registry-national".into();
        config.sections().validate().unwrap();
        config.database.max_connections = 0;
        let error = config.sections().validate().unwrap_err().to_string();
        assert!(error.contains("database.max_connections"), "{error}");
    }
}
