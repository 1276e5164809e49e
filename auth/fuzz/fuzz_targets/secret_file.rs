//! Fuzzes the loaders of the secret files (`jwt.secret`, `admin.token`):
//! whatever an operator or a broken disk leaves in the file, loading never
//! panics, and a secret it returns is non-empty and trimmed. Reading an
//! existing file never replaces it.
#![no_main]

use std::sync::LazyLock;

use ferry_auth::{SECRET_FILE, SecretSource, load_or_create_secret_file, load_secret};
use libfuzzer_sys::fuzz_target;
use tempfile::TempDir;

static DIR: LazyLock<TempDir> = LazyLock::new(|| tempfile::tempdir().expect("temp dir"));

fuzz_target!(|data: &[u8]| {
    let dir = DIR.path();
    let path = dir.join(SECRET_FILE);
    std::fs::write(&path, data).expect("write the secret file");
    let loaded = match load_secret(None, dir) {
        Ok(Some(secret)) => {
            let text = std::str::from_utf8(&secret).expect("a secret read as text");
            assert!(!text.is_empty());
            assert_eq!(text, text.trim(), "secret not trimmed");
            Some(secret)
        }
        Ok(None) => panic!("the file exists"),
        Err(_) => None,
    };
    match load_or_create_secret_file(dir, SECRET_FILE) {
        Ok((secret, source)) => {
            assert!(matches!(source, SecretSource::File(_)), "{source:?}");
            assert_eq!(Some(secret), loaded);
        }
        Err(_) => assert!(loaded.is_none()),
    }
    assert_eq!(std::fs::read(&path).expect("read back"), data, "file replaced");
});
