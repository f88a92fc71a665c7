//! Finding the CUDA libraries that `cudarc` loads at run time (its own crate: the kernels' device
//! seam, the NCCL transport of `dist` and the launcher all need it, and the launcher needs nothing
//! else of the kernels).
//!
//! `cudarc` (built with `dynamic-loading`) opens each library by a fixed list of file names
//! (`cudarc::get_lib_name_candidates`: for NCCL `libnccl.so`, `libnccl.so.13`, `libnccl.so.12`,
//! …), through the dynamic loader's ordinary search (`LD_LIBRARY_PATH`, then the system's
//! `ld.so.cache`). Two common installs fall outside that:
//!
//! - NVIDIA's Python wheels (`nvidia-nccl-cu12`, `nvidia-cuda-nvrtc`, …, what `pip install torch`
//!   brings) put the libraries under `site-packages/nvidia/<package>/lib`, a directory nothing
//!   adds to the search path;
//! - NCCL's runtime package and wheel ship only `libnccl.so.2` (its soname); `libnccl.so` comes
//!   with the development package, and `.2` is not among the names `cudarc` tries.
//!
//! [`Resolution::find`] looks in the places users have these libraries (below, in order) and
//! [`Resolution::library_path`] makes them loadable: a directory of links named as `cudarc` asks
//! (`libnccl.so → …/libnccl.so.2`) plus every directory that holds a found library, put in
//! front of `LD_LIBRARY_PATH`. The launcher does this for the workers of GPU runs; `trainer
//! cuda-libs` prints the same for a worker started another way (srun, a hand-written torchrun
//! line). The dynamic loader reads `LD_LIBRARY_PATH` once, when a process starts: it must be set
//! for the worker, not by it.
//!
//! Where it looks, in order: `TESSERA_CUDA_LIB_PATH` (colon-separated directories, searched
//! first), `LD_LIBRARY_PATH`, `$CUDA_HOME`, `$CUDA_PATH`, `$CUDA_ROOT`,
//! `$CUDA_TOOLKIT_ROOT_DIR` (their `lib64`, `lib`, `targets/<arch>-linux/lib`), `$NCCL_HOME`,
//! the Python environments `$VIRTUAL_ENV` and `$CONDA_PREFIX` (`nvidia/*/lib` in their
//! `site-packages`, and `$CONDA_PREFIX/lib`), the `site-packages` of `python3` on the `PATH` (or
//! `$TESSERA_PYTHON`), `/usr/local/cuda`, and the system library directories.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A library `cudarc` loads: its name as `cudarc` spells it, what it is, and the file names
/// installs actually ship that `cudarc` may not try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Library {
    /// `cudarc`'s name (`nccl` → `libnccl.so`, …).
    pub key: &'static str,
    /// For people: "NCCL", "the CUDA driver", ….
    pub what: &'static str,
    /// Sonames of real installs (`libnccl.so.2`), linked to under a name `cudarc` tries when no
    /// such name exists.
    pub sonames: &'static [&'static str],
    /// How people usually install it.
    pub install: &'static str,
}

pub const DRIVER: Library = Library {
    key: "cuda",
    what: "the CUDA driver",
    sonames: &["libcuda.so.1"],

    install: "the NVIDIA driver",
};
pub const NCCL: Library = Library {
    key: "nccl",
    what: "NCCL",
    sonames: &["libnccl.so.2"],

    install: "`pip install nvidia-nccl-cu12` (or -cu13), or NVIDIA's libnccl2 package",
};
pub const NVRTC: Library = Library {
    key: "nvrtc",
    what: "NVRTC",
    sonames: &["libnvrtc.so.13", "libnvrtc.so.12"],

    install: "the CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12`",
};
pub const CUBLAS: Library = Library {
    key: "cublas",
    what: "cuBLAS",
    sonames: &["libcublas.so.13", "libcublas.so.12"],

    install: "the CUDA toolkit, or `pip install nvidia-cublas-cu12`",
};
pub const CUBLASLT: Library = Library {
    key: "cublasLt",
    what: "cuBLASLt",
    sonames: &["libcublasLt.so.13", "libcublasLt.so.12"],

    install: "the CUDA toolkit, or `pip install nvidia-cublas-cu12`",
};

/// The libraries a GPU run may load, in the order reports list them.
pub const ALL: [Library; 5] = [DRIVER, NCCL, NVRTC, CUBLAS, CUBLASLT];

/// The longest wait for `python3` to list its `site-packages`: a cold interpreter on a
/// freshly started machine can take seconds. Where even this is too short, name the wheel's
/// directory in [`PATH_VAR`] (scripts/gpu-check.sh does).
pub const PYTHON_TIMEOUT: Duration = Duration::from_secs(10);

/// The variable whose directories are searched before anything else.
pub const PATH_VAR: &str = "TESSERA_CUDA_LIB_PATH";

/// Every variable the search reads (tests clear them to search a machine's system directories
/// only; `TESSERA_PYTHON` is pointed at nothing instead).
pub const SEARCH_VARS: [&str; 9] = [
    PATH_VAR,
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_ROOT",
    "CUDA_TOOLKIT_ROOT_DIR",
    "NCCL_HOME",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
];

/// File names `cudarc` tries for `lib`, in its order, each once.
pub fn cudarc_names(lib: &Library) -> Vec<String> {
    let mut names = cudarc::get_lib_name_candidates(lib.key);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// `cudarc`'s names and the sonames, for messages: "libnccl.so, …, or libnccl.so.2".
fn all_names(lib: &Library) -> String {
    let mut names = cudarc_names(lib);
    for s in lib.sonames {
        if !names.iter().any(|n| n == s) {
            names.push(s.to_string());
        }
    }
    let last = names.pop().unwrap_or_default();
    if names.is_empty() {
        last
    } else {
        format!("{} or {last}", names.join(", "))
    }
}

/// A directory searched, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchDir {
    pub dir: PathBuf,
    /// Where the directory came from (`LD_LIBRARY_PATH`, `$CUDA_HOME`, `python3 site-packages`, …).
    pub source: String,
}

/// Where a library was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub dir: PathBuf,
    /// The file in `dir`.
    pub file: String,
    /// The search entry's source.
    pub source: String,
    /// `Some(name)`: `file` is not among the names `cudarc` tries; a link `name → dir/file` makes
    /// it loadable.
    pub link_as: Option<String>,
}

impl Found {
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.file)
    }
}

/// What was found for each of [`ALL`].
#[derive(Clone, Debug)]
pub struct Resolution {
    pub searched: Vec<SearchDir>,
    pub found: Vec<(Library, Option<Found>)>,
}

/// A library that a run needs and that could not be found.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} not found: no directory searched holds {names} (searched: {dirs}). Install it \
     ({install}), or set {PATH_VAR} to the directory that holds it"
)]
pub struct NotFound {
    pub what: &'static str,
    pub names: String,
    pub dirs: String,
    pub install: &'static str,
}

/// The directories of the system's own search (found without `LD_LIBRARY_PATH`).
const SYSTEM_DIRS: [&str; 6] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/lib/x86_64-linux-gnu",
    "/lib64",
];

impl Resolution {
    /// Searches the environment `get` describes; `site_packages` lists a Python's
    /// `site-packages` directories (see [`python_site_packages`]).
    pub fn find(get: &dyn Fn(&str) -> Option<String>, site_packages: &[PathBuf]) -> Resolution {
        let searched = search_dirs(get, site_packages);
        let found = ALL
            .iter()
            .map(|lib| (*lib, find_in(lib, &searched)))
            .collect();
        Resolution { searched, found }
    }

    /// The process's environment, `python3` (or `$TESSERA_PYTHON`) asked for its
    /// `site-packages` ([`PYTHON_TIMEOUT`] at most).
    pub fn from_env() -> Resolution {
        let get = |k: &str| std::env::var(k).ok();
        let python = get("TESSERA_PYTHON").unwrap_or_else(|| "python3".into());
        Resolution::find(&get, &python_site_packages(&python, PYTHON_TIMEOUT))
    }

    pub fn get(&self, lib: &Library) -> Option<&Found> {
        self.found
            .iter()
            .find(|(l, _)| l == lib)
            .and_then(|(_, f)| f.as_ref())
    }

    /// Where `lib` is, or an error naming it, the names tried and the directories searched.
    pub fn require(&self, lib: &Library) -> Result<&Found, NotFound> {
        self.get(lib).ok_or_else(|| NotFound {
            what: lib.what,
            names: all_names(lib),
            install: lib.install,
            dirs: self
                .searched
                .iter()
                .map(|s| s.dir.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Makes every found library loadable by the name `cudarc` tries: links in `link_dir`
    /// (created if needed; a link is replaced atomically) for libraries found only under their
    /// soname, then returns the `LD_LIBRARY_PATH` to start workers with: `link_dir` when it holds
    /// a link, the found libraries' directories outside the system's own, then `existing`.
    pub fn library_path(&self, link_dir: &Path, existing: Option<&str>) -> std::io::Result<String> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let push = |d: PathBuf, dirs: &mut Vec<PathBuf>| {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        };
        for (_, found) in &self.found {
            let Some(f) = found else { continue };
            if let Some(name) = &f.link_as {
                std::fs::create_dir_all(link_dir)?;
                let tmp = link_dir.join(format!(".{name}.{}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(f.path(), &tmp)?;
                std::fs::rename(&tmp, link_dir.join(name))?;
                push(link_dir.to_path_buf(), &mut dirs);
            }
        }
        for (_, found) in &self.found {
            let Some(f) = found else { continue };
            if !SYSTEM_DIRS.iter().any(|s| Path::new(s) == f.dir) {
                push(f.dir.clone(), &mut dirs);
            }
        }
        let mut parts: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        if let Some(e) = existing.filter(|e| !e.is_empty()) {
            for p in e.split(':') {
                if !parts.iter().any(|x| x == p) {
                    parts.push(p.to_string());
                }
            }
        }
        Ok(parts.join(":"))
    }

    /// One line per library: where it is, or that it is missing.
    pub fn report(&self) -> String {
        let mut out = String::from("Found on this machine:\n");
        for (lib, found) in &self.found {
            let line = match found {
                Some(f) => match &f.link_as {
                    Some(n) => format!(
                        "{:<16} {} (from {}; loadable once linked as {n})",
                        lib.what,
                        f.path().display(),
                        f.source
                    ),
                    None => format!(
                        "{:<16} {} (from {})",
                        lib.what,
                        f.path().display(),
                        f.source
                    ),
                },
                None => format!("{:<16} not found", lib.what),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

/// The first directory, in search order, that holds any acceptable name of `lib`: a name
/// `cudarc` tries (used as it is), else one of its sonames (to be linked under `cudarc`'s first
/// name). Directory order wins over the kind of name, so a `libnccl.so.2` in a directory the user
/// put first (`TESSERA_CUDA_LIB_PATH`) beats a `libnccl.so` found later.
fn find_in(lib: &Library, dirs: &[SearchDir]) -> Option<Found> {
    let names = cudarc_names(lib);
    dirs.iter().find_map(|d| {
        let found = |file: &str, link_as: Option<String>| Found {
            dir: d.dir.clone(),
            file: file.to_string(),
            source: d.source.clone(),
            link_as,
        };
        if let Some(n) = names.iter().find(|n| d.dir.join(n).is_file()) {
            return Some(found(n, None));
        }
        lib.sonames
            .iter()
            .find(|n| d.dir.join(n).is_file())
            .map(|n| found(n, names.first().cloned()))
    })
}

/// The directories searched, in order, without duplicates and without ones that do not exist.
pub fn search_dirs(
    get: &dyn Fn(&str) -> Option<String>,
    site_packages: &[PathBuf],
) -> Vec<SearchDir> {
    let mut out: Vec<SearchDir> = Vec::new();
    let mut add = |dir: PathBuf, source: &str| {
        if dir.is_dir() && !out.iter().any(|s| s.dir == dir) {
            out.push(SearchDir {
                dir,
                source: source.to_string(),
            });
        }
    };
    for var in [PATH_VAR, "LD_LIBRARY_PATH"] {
        if let Some(v) = get(var) {
            for p in v.split(':').filter(|p| !p.is_empty()) {
                add(PathBuf::from(p), var);
            }
        }
    }
    let arch = std::env::consts::ARCH;
    for var in [
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_ROOT",
        "CUDA_TOOLKIT_ROOT_DIR",
        "NCCL_HOME",
    ] {
        if let Some(root) = get(var).filter(|v| !v.is_empty()) {
            let root = PathBuf::from(root);
            for sub in [
                "lib64".to_string(),
                "lib".into(),
                format!("targets/{arch}-linux/lib"),
            ] {
                add(root.join(sub), &format!("${var}"));
            }
        }
    }
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = get(var).filter(|v| !v.is_empty()) {
            let prefix = PathBuf::from(prefix);
            for site in prefix_site_packages(&prefix) {
                for lib in nvidia_lib_dirs(&site) {
                    add(lib, &format!("${var} site-packages"));
                }
            }
            if var == "CONDA_PREFIX" {
                add(prefix.join("lib"), "$CONDA_PREFIX");
            }
        }
    }
    for site in site_packages {
        for lib in nvidia_lib_dirs(site) {
            add(lib, "python site-packages");
        }
    }
    for dir in [
        "/usr/local/cuda/lib64".to_string(),
        format!("/usr/local/cuda/targets/{arch}-linux/lib"),
        "/usr/local/nvidia/lib64".into(),
    ] {
        add(PathBuf::from(dir), "/usr/local");
    }
    for dir in SYSTEM_DIRS {
        add(PathBuf::from(dir), "system");
    }
    out
}

/// `lib/python3.*/site-packages` under a prefix (a virtualenv or conda environment).
fn prefix_site_packages(prefix: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for lib in ["lib", "lib64"] {
        let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .map(|p| p.join("site-packages"))
            .filter(|p| p.is_dir())
            .collect();
        names.sort();
        out.extend(names);
    }
    out
}

/// `nvidia/*/lib` under a `site-packages` directory (NVIDIA's wheels), sorted.
fn nvidia_lib_dirs(site: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(site.join("nvidia")) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("lib"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The `site-packages` directories of `python` (`sys.path` entries that exist), or nothing if
/// it is absent, fails or takes longer than `timeout`.
pub fn python_site_packages(python: &str, timeout: Duration) -> Vec<PathBuf> {
    use std::process::{Command, Stdio};
    let child = Command::new(python)
        .args(["-c", "import sys\nfor p in sys.path: print(p)"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Vec::new();
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Vec::new();
            }
        }
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        use std::io::Read;
        let _ = out.read_to_string(&mut text);
    }
    text.lines()
        .filter(|l| l.ends_with("-packages"))
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .collect()
}

/// True when `cudarc` can load `lib` in this process (by the names it tries, through the
/// dynamic loader's search).
pub fn loadable(lib: &Library) -> bool {
    // SAFETY: these only try to open the library (dlopen) and close it again.
    unsafe {
        match lib.key {
            "cuda" => cudarc::driver::sys::is_culib_present(),
            "nccl" => cudarc::nccl::sys::is_culib_present(),
            _ => cudarc_names(lib).iter().any(|n| libloading_open(n)),
        }
    }
}

/// The number of CUDA devices this process sees, when the driver loads and answers.
pub fn device_count() -> Option<usize> {
    if !loadable(&DRIVER) {
        return None;
    }
    cudarc::driver::CudaContext::device_count()
        .ok()
        .map(|n| n.max(0) as usize)
}

/// Opens and closes a library by name through the dynamic loader.
///
/// # Safety
/// Running a library's initialisers is the caller's risk; CUDA's are benign.
unsafe fn libloading_open(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
    if h.is_null() {
        return false;
    }
    libc::dlclose(h);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    fn env(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn wheels_in_a_virtualenv_are_found_and_nccl_is_linked_under_a_name_cudarc_tries() {
        let t = tempfile::tempdir().unwrap();
        let venv = t.path().join("venv");
        let site = venv.join("lib/python3.12/site-packages");
        touch(&site.join("nvidia/nccl/lib/libnccl.so.2"));
        touch(&site.join("nvidia/cu13/lib/libnvrtc.so.13"));
        touch(&site.join("nvidia/cu13/lib/libcublas.so.13"));
        let get = env(&[
            ("VIRTUAL_ENV", venv.display().to_string()),
            ("LD_LIBRARY_PATH", "/opt/elsewhere".into()),
        ]);
        let r = Resolution::find(&get, &[]);

        let nccl = r.require(&NCCL).unwrap();
        assert_eq!(nccl.dir, site.join("nvidia/nccl/lib"));
        assert_eq!(nccl.file, "libnccl.so.2");
        assert_eq!(nccl.source, "$VIRTUAL_ENV site-packages");
        assert_eq!(nccl.link_as.as_deref(), Some("libnccl.so"));
        assert!(cudarc_names(&NCCL).contains(&"libnccl.so".to_string()));
        // libnvrtc.so.13 is itself a name cudarc (built for CUDA 13) tries: no link needed.
        let nvrtc = r.require(&NVRTC).unwrap();
        assert_eq!(
            (nvrtc.file.as_str(), nvrtc.link_as.as_ref()),
            ("libnvrtc.so.13", None)
        );

        let links = t.path().join("links");
        let path = r.library_path(&links, Some("/opt/elsewhere")).unwrap();
        let parts: Vec<&str> = path.split(':').collect();
        assert_eq!(parts[0], links.display().to_string());
        assert!(parts.contains(&site.join("nvidia/cu13/lib").display().to_string().as_str()));
        assert_eq!(*parts.last().unwrap(), "/opt/elsewhere");
        let link = links.join("libnccl.so");
        assert_eq!(std::fs::read_link(&link).unwrap(), nccl.path());
        // Again: the link is replaced, not an error.
        assert_eq!(
            r.library_path(&links, Some("/opt/elsewhere")).unwrap(),
            path
        );
    }

    #[test]
    fn search_order_explicit_variable_first_then_ld_library_path_then_cuda_home() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            t.path().join("a"),
            t.path().join("b"),
            t.path().join("cuda"),
        );
        // The soname in `a` (the user's TESSERA_CUDA_LIB_PATH) beats the development name found
        // later in `b`: directory order decides, and a link makes the soname loadable.
        touch(&a.join("libnccl.so.2"));
        touch(&b.join("libnccl.so"));
        touch(&c.join("lib64/libnvrtc.so.12"));
        let get = env(&[
            (PATH_VAR, a.display().to_string()),
            (
                "LD_LIBRARY_PATH",
                format!("{}::/does/not/exist", b.display()),
            ),
            ("CUDA_HOME", c.display().to_string()),
        ]);
        let r = Resolution::find(&get, &[]);
        let sources: Vec<&str> = r
            .searched
            .iter()
            .take(3)
            .map(|s| s.source.as_str())
            .collect();
        assert_eq!(sources, [PATH_VAR, "LD_LIBRARY_PATH", "$CUDA_HOME"]);
        let nccl = r.require(&NCCL).unwrap();
        assert_eq!(
            (nccl.dir.as_path(), nccl.file.as_str(), nccl.source.as_str()),
            (a.as_path(), "libnccl.so.2", PATH_VAR)
        );
        assert_eq!(nccl.link_as.as_deref(), Some("libnccl.so"));
        // The workers' path puts the link (to a's library) before b, which also holds the name.
        let links = t.path().join("links");
        let path = r
            .library_path(&links, Some(&b.display().to_string()))
            .unwrap();
        let parts: Vec<&str> = path.split(':').collect();
        assert_eq!(parts[0], links.display().to_string(), "{path}");
        assert_eq!(
            std::fs::read_link(links.join("libnccl.so")).unwrap(),
            a.join("libnccl.so.2")
        );
        let pos = |d: &Path| parts.iter().position(|p| *p == d.display().to_string());
        assert!(pos(&a) < pos(&b), "{path}");
        assert_eq!(r.require(&NVRTC).unwrap().dir, c.join("lib64"));
        assert!(r.report().contains("NCCL"), "{}", r.report());
    }

    #[test]
    fn the_first_directory_with_any_acceptable_name_wins_and_prefers_cudarcs_name() {
        let t = tempfile::tempdir().unwrap();
        let (early, late) = (t.path().join("early"), t.path().join("late"));
        touch(&early.join("libnccl.so.2"));
        touch(&late.join("libnccl.so"));
        let ld = |dirs: &[&Path]| {
            let v: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            env(&[("LD_LIBRARY_PATH", v.join(":"))])
        };
        let r = Resolution::find(&ld(&[&early, &late]), &[]);
        let nccl = r.require(&NCCL).unwrap();
        assert_eq!(
            (nccl.dir.as_path(), nccl.file.as_str()),
            (early.as_path(), "libnccl.so.2")
        );
        // In the other order the development name comes first and needs no link.
        let r = Resolution::find(&ld(&[&late, &early]), &[]);
        let nccl = r.require(&NCCL).unwrap();
        assert_eq!(
            (nccl.dir.as_path(), nccl.link_as.as_ref()),
            (late.as_path(), None)
        );
        // One directory with both: cudarc's name, no link.
        touch(&early.join("libnccl.so"));
        let r = Resolution::find(&ld(&[&early, &late]), &[]);
        let nccl = r.require(&NCCL).unwrap();
        assert_eq!(
            (
                nccl.dir.as_path(),
                nccl.file.as_str(),
                nccl.link_as.as_ref()
            ),
            (early.as_path(), "libnccl.so", None)
        );
    }

    #[test]
    fn python_site_packages_are_searched() {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site-packages");
        touch(&site.join("nvidia/nccl/lib/libnccl.so.2"));
        let r = Resolution::find(&env(&[]), std::slice::from_ref(&site));
        let nccl = r.require(&NCCL).unwrap();
        assert_eq!(nccl.source, "python site-packages");
        // A python that does not exist gives nothing, not an error.
        assert!(python_site_packages("/nonexistent/python3", Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn a_missing_library_names_itself_the_names_tried_and_what_to_set() {
        let r = Resolution {
            searched: vec![SearchDir {
                dir: "/x/lib".into(),
                source: "LD_LIBRARY_PATH".into(),
            }],
            found: ALL.iter().map(|l| (*l, None)).collect(),
        };
        let e = r.require(&NCCL).unwrap_err().to_string();
        for want in [
            "NCCL not found",
            "libnccl.so",
            "libnccl.so.2",
            "/x/lib",
            PATH_VAR,
        ] {
            assert!(e.contains(want), "{want:?} missing from: {e}");
        }
        assert!(r.report().contains("not found"));
    }
}
