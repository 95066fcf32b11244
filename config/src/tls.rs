//! Certificate material as Traefik writes it: file paths or inline PEM data.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// A file path or the PEM data itself (Traefik's `FileOrContent`).
///
/// A value that contains `-----BEGIN` is data; anything else is a path, resolved against the folder
/// of the configuration file that declared it (see [`FileOrContent::resolve_against`]).
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileOrContent(pub String);

impl FileOrContent {
    /// True when the value is inline PEM data rather than a path.
    pub fn is_inline(&self) -> bool {
        self.0.contains("-----BEGIN")
    }

    /// The path, when the value is one.
    pub fn path(&self) -> Option<&Path> {
        (!self.is_inline() && !self.0.is_empty()).then(|| Path::new(&self.0))
    }

    /// Makes a relative path absolute against `dir`; inline data and absolute paths are unchanged.
    pub fn resolve_against(&mut self, dir: &Path) {
        if let Some(p) = self.path()
            && p.is_relative()
        {
            self.0 = dir.join(p).to_string_lossy().into_owned();
        }
    }

    /// The bytes: the file's content, or the inline data.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match self.path() {
            Some(p) => std::fs::read(p),
            None => Ok(self.0.as_bytes().to_vec()),
        }
    }
}

impl fmt::Debug for FileOrContent {
    /// Inline data may hold a private key: it is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_inline() {
            f.write_str("FileOrContent(<inline PEM>)")
        } else {
            write!(f, "FileOrContent({:?})", self.0)
        }
    }
}

impl From<&str> for FileOrContent {
    fn from(s: &str) -> Self {
        FileOrContent(s.to_owned())
    }
}

impl From<PathBuf> for FileOrContent {
    fn from(p: PathBuf) -> Self {
        FileOrContent(p.to_string_lossy().into_owned())
    }
}

/// Cipher suite names accepted in `tls.options.<name>.cipherSuites` (Go's names, as Traefik
/// writes them): the AEAD suites with forward secrecy that rustls implements. Go's other names
/// (CBC, RSA key exchange, 3DES, RC4) are refused with an error naming the option.
pub const CIPHER_SUITES: &[&str] = &[
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// Group names accepted in `tls.options.<name>.curvePreferences` (Go's names, as Traefik writes
/// them). `CurveP521` and post-quantum hybrids are not available with the ring provider.
pub const CURVES: &[&str] = &["X25519", "CurveP256", "CurveP384"];

/// A client certificate of a servers transport's `tls.certificates`.
///
/// Traefik's documentation writes them as plain strings (`"/path/to/cert1.pem"`): such a string is a
/// file (or PEM data) holding the certificate chain **and** its private key. The structured form
/// `{certFile, keyFile}` gives them separately.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ClientCertificate {
    /// One file or PEM block set holding chain and key.
    Bundle(FileOrContent),
    /// Chain and key given separately.
    Pair {
        /// Certificate chain (path or PEM data).
        #[serde(rename = "certFile")]
        cert_file: FileOrContent,
        /// Private key (path or PEM data).
        #[serde(rename = "keyFile")]
        key_file: FileOrContent,
    },
}

impl ClientCertificate {
    /// Resolves relative paths against `dir`.
    pub fn resolve_against(&mut self, dir: &Path) {
        match self {
            ClientCertificate::Bundle(f) => f.resolve_against(dir),
            ClientCertificate::Pair {
                cert_file,
                key_file,
            } => {
                cert_file.resolve_against(dir);
                key_file.resolve_against(dir);
            }
        }
    }
}

impl<'de> Deserialize<'de> for ClientCertificate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ClientCertificate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a certificate path or PEM data, or a table with certFile and keyFile")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ClientCertificate::Bundle(FileOrContent(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut cert = None;
                let mut key = None;
                while let Some(k) = map.next_key::<String>()? {
                    match k.to_ascii_lowercase().as_str() {
                        "certfile" => cert = Some(map.next_value::<FileOrContent>()?),
                        "keyfile" => key = Some(map.next_value::<FileOrContent>()?),
                        _ => {
                            return Err(de::Error::unknown_field(&k, &["certFile", "keyFile"]));
                        }
                    }
                }
                Ok(ClientCertificate::Pair {
                    cert_file: cert.ok_or_else(|| de::Error::missing_field("certFile"))?,
                    key_file: key.ok_or_else(|| de::Error::missing_field("keyFile"))?,
                })
            }
        }
        deserializer.deserialize_any(V)
    }
}
