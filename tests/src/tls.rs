//! Test certificates made at test time with `rcgen` (never a checked-in
//! private key): a CA, and server certificates it signs.

use std::path::{Path, PathBuf};

use ferry_protocol::client::{TlsConnector, Transport};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// A throwaway certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA with a fresh P-256 key.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate, PEM (what a client trusts).
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` signed by this CA: (chain PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a server certificate for `names` to `dir/cert.pem` and
    /// `dir/key.pem` (replacing them) and returns the paths.
    pub fn write_leaf(&self, dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(names);
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        // Write then rename: a reload never sees half a file.
        for (path, text) in [(&cert_path, cert), (&key_path, key)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write PEM");
            std::fs::rename(&tmp, path).expect("rename PEM");
        }
        (cert_path, key_path)
    }

    /// A client transport trusting this CA and verifying `server_name`.
    pub fn transport(&self, server_name: &str) -> Transport {
        Transport::Tls(
            TlsConnector::from_ca_pem(self.ca_pem().as_bytes())
                .expect("CA PEM")
                .with_server_name(server_name)
                .expect("server name"),
        )
    }
}
