//! The server binary's dynamic linking: it must keep `libtorch_cuda.so` as a
//! needed library when libtorch has one (rustc links with `--as-needed`, and
//! nothing references CUDA symbols directly, so the linker would drop it and
//! CUDA would be invisible at run time), and find libtorch without
//! `LD_LIBRARY_PATH` through its RUNPATH.

use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::ElfFile64;
use object::Endianness;

/// DT_NEEDED and DT_RUNPATH/DT_RPATH entries of an ELF executable.
struct DynamicSection {
    needed: Vec<String>,
    search_paths: Vec<PathBuf>,
}

fn read_dynamic_section(binary: &Path) -> DynamicSection {
    let data = std::fs::read(binary).unwrap();
    let file = ElfFile64::<Endianness>::parse(&*data).unwrap();
    let table = file
        .elf_section_table()
        .dynamic_table(file.endian(), &*data)
        .unwrap();
    let mut section = DynamicSection {
        needed: Vec::new(),
        search_paths: Vec::new(),
    };
    for entry in table.iter() {
        let text = || String::from_utf8(table.string(entry).unwrap().to_vec()).unwrap();
        match entry.tag {
            elf::DT_NEEDED => section.needed.push(text()),
            elf::DT_RUNPATH | elf::DT_RPATH => section
                .search_paths
                .extend(text().split(':').map(PathBuf::from)),
            _ => {}
        }
    }
    section
}

/// libtorch's `lib/` as build.rs finds it: `$LIBTORCH/lib`, else the RUNPATH
/// entry of the binary that holds libtorch.
fn libtorch_lib_dir(section: &DynamicSection) -> PathBuf {
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        return PathBuf::from(libtorch).join("lib");
    }
    section
        .search_paths
        .iter()
        .find(|dir| dir.join("libtorch_cpu.so").exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "LIBTORCH is unset and no RUNPATH entry holds libtorch_cpu.so: {:?}",
                section.search_paths
            )
        })
}

#[test]
fn server_binary_needs_libtorch_cuda_whenever_libtorch_provides_it() {
    let binary = Path::new(env!("CARGO_BIN_EXE_normserve"));
    let section = read_dynamic_section(binary);
    let lib_dir = libtorch_lib_dir(&section);

    if lib_dir.join("libtorch_cuda.so").exists() {
        assert!(
            section.needed.iter().any(|n| n == "libtorch_cuda.so"),
            "{} has libtorch_cuda.so but {} needs only {:?}",
            lib_dir.display(),
            binary.display(),
            section.needed
        );
    } else {
        println!(
            "{} has no libtorch_cuda.so (a CPU-only libtorch): checking libtorch_cpu.so instead",
            lib_dir.display()
        );
    }
    assert!(
        section.needed.iter().any(|n| n == "libtorch_cpu.so"),
        "{:?}",
        section.needed
    );
}

#[test]
fn server_binary_finds_libtorch_through_its_runpath() {
    let binary = Path::new(env!("CARGO_BIN_EXE_normserve"));
    let section = read_dynamic_section(binary);
    let lib_dir = libtorch_lib_dir(&section);
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let wanted = canonical(&lib_dir);
    assert!(
        section
            .search_paths
            .iter()
            .any(|dir| canonical(dir) == wanted),
        "no RUNPATH/RPATH entry of {} points at {}: {:?}",
        binary.display(),
        lib_dir.display(),
        section.search_paths
    );
}
