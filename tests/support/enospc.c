/* A full disk on demand: an LD_PRELOAD shim that makes the Nth call that changes the disk fail with ENOSPC.
 *
 * The tests (tests/integration/test_faults_disk_full.py, via tests/support/faults.py) compile it with
 *     gcc -shared -fPIC -O2 -o enospc.so enospc.c -ldl
 * and run a Python child with LD_PRELOAD=enospc.so. Nothing is counted until the child calls
 * enospc_arm() (through ctypes), so interpreter start-up and imports do not shift the count; from then on
 * every call below that changes a file or the directory tree is one "write point":
 *
 *     open, open64, openat, openat64, creat (and their _FORTIFY_SOURCE __*_2 forms) with O_CREAT or O_TRUNC;
 *     write, pwrite, writev, pwritev (and 64-bit forms), sendfile, copy_file_range, on regular files only
 *     (a log line to a pipe or terminal is not a commit's write);
 *     ftruncate, truncate, fallocate, posix_fallocate, fsync, fdatasync, sync_file_range, msync (the
 *     log names the file mapped);
 *     rename, renameat, renameat2, link, linkat, unlink, unlinkat, symlink, mkstemp;
 *     fchmod, fchown (the inode changes too).
 *
 * Environment:
 *     ENOSPC_FAIL_AT=N    the Nth write point (1-based) fails with errno ENOSPC; 0 or unset: none does
 *     ENOSPC_PERSIST=1    every write point from the Nth on fails, as on a disk that stays full
 *     ENOSPC_LOG=PATH     one line per write point: "N function detail", with " ENOSPC" when it failed
 *
 * What it cannot see: stores into a MAP_SHARED mapping (gdbm's mmap) are not calls; they reach the disk
 * through msync or fsync, which are counted. A call libc makes to itself (posix_fallocate falling back to
 * pwrite) is not seen either: the outer call is the write point.
 *
 * See ld.so(8) for LD_PRELOAD and dlsym(3) for RTLD_NEXT.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int armed;
static long counted;
static long fail_at;
static int persist;
static int log_fd = -1;

static void *next(const char *name)
{
    void *function = dlsym(RTLD_NEXT, name);
    if (function == NULL) {
        static const char message[] = "enospc.so: a libc function is missing\n";
        syscall(SYS_write, 2, message, sizeof message - 1);
        abort();
    }
    return function;
}

/* The next definition of `name` (libc's), with the prototype the headers give it. */
#define REAL(name) static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)next(#name)

/* What _FORTIFY_SOURCE builds call instead of open(2) and openat(2) when the mode argument is absent. */
int __open_2(const char *path, int flags);
int __open64_2(const char *path, int flags);
int __openat_2(int directory, const char *path, int flags);
int __openat64_2(int directory, const char *path, int flags);

static void log_line(long index, const char *function, const char *detail, int failed)
{
    char line[512];
    int length;
    if (log_fd < 0)
        return;
    length = snprintf(line, sizeof line, "%ld %s %s%s\n", index, function, detail ? detail : "", failed ? " ENOSPC" : "");
    if (length > (int)sizeof line - 1)
        length = sizeof line - 1;
    syscall(SYS_write, log_fd, line, (size_t)length); /* a raw system call: never counted, never recursing */
}

/* Counts one write point; true when this one must fail (errno is then ENOSPC). */
static int write_point(const char *function, const char *detail)
{
    long index;
    int fail;
    if (!armed)
        return 0;
    index = ++counted;
    fail = fail_at > 0 && (index == fail_at || (persist && index > fail_at));
    log_line(index, function, detail, fail);
    if (fail)
        errno = ENOSPC;
    return fail;
}

static const char *describe_fd(int fd, char *buffer, size_t size)
{
    char link[64];
    ssize_t length;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    length = readlink(link, buffer, size - 1);
    if (length < 0)
        length = 0;
    buffer[length] = '\0';
    return buffer;
}

static int on_disk(int fd)
{
    struct stat status;
    return fstat(fd, &status) == 0 && (S_ISREG(status.st_mode) || S_ISDIR(status.st_mode));
}

static int fd_point(const char *function, int fd)
{
    char path[400];
    if (!armed || !on_disk(fd))
        return 0;
    return write_point(function, describe_fd(fd, path, sizeof path));
}

static int path_point(const char *function, const char *first, const char *second)
{
    char detail[450];
    if (!armed)
        return 0;
    snprintf(detail, sizeof detail, "%s%s%s", first ? first : "", second ? " -> " : "", second ? second : "");
    return write_point(function, detail);
}

void enospc_arm(void)
{
    const char *text = getenv("ENOSPC_FAIL_AT");
    const char *log_path = getenv("ENOSPC_LOG");
    fail_at = text ? atol(text) : 0;
    persist = getenv("ENOSPC_PERSIST") && strcmp(getenv("ENOSPC_PERSIST"), "1") == 0;
    counted = 0;
    if (log_path && *log_path && log_fd < 0)
        log_fd = (int)syscall(SYS_openat, AT_FDCWD, log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    armed = 1;
}

/* Stops counting and failing; returns how many write points were counted since enospc_arm(). */
long enospc_disarm(void)
{
    armed = 0;
    return counted;
}

/* ---- opening ---- */

static mode_t mode_argument(int flags, va_list arguments)
{
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(arguments, int) : 0;
}

/* O_TMPFILE includes O_DIRECTORY: test all of its bits, or every directory opened would count. */
#define CHANGES(flags) (((flags) & (O_CREAT | O_TRUNC)) || ((flags) & O_TMPFILE) == O_TMPFILE)

int open(const char *path, int flags, ...)
{
    va_list arguments;
    mode_t mode;
    REAL(open);
    va_start(arguments, flags);
    mode = mode_argument(flags, arguments);
    va_end(arguments);
    if (CHANGES(flags) && path_point("open", path, NULL))
        return -1;
    return real_open(path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
    va_list arguments;
    mode_t mode;
    REAL(open64);
    va_start(arguments, flags);
    mode = mode_argument(flags, arguments);
    va_end(arguments);
    if (CHANGES(flags) && path_point("open64", path, NULL))
        return -1;
    return real_open64(path, flags, mode);
}

int __open_2(const char *path, int flags)
{
    REAL(__open_2);
    if (CHANGES(flags) && path_point("__open_2", path, NULL))
        return -1;
    return real___open_2(path, flags);
}

int __open64_2(const char *path, int flags)
{
    REAL(__open64_2);
    if (CHANGES(flags) && path_point("__open64_2", path, NULL))
        return -1;
    return real___open64_2(path, flags);
}

int openat(int directory, const char *path, int flags, ...)
{
    va_list arguments;
    mode_t mode;
    REAL(openat);
    va_start(arguments, flags);
    mode = mode_argument(flags, arguments);
    va_end(arguments);
    if (CHANGES(flags) && path_point("openat", path, NULL))
        return -1;
    return real_openat(directory, path, flags, mode);
}

int openat64(int directory, const char *path, int flags, ...)
{
    va_list arguments;
    mode_t mode;
    REAL(openat64);
    va_start(arguments, flags);
    mode = mode_argument(flags, arguments);
    va_end(arguments);
    if (CHANGES(flags) && path_point("openat64", path, NULL))
        return -1;
    return real_openat64(directory, path, flags, mode);
}

int __openat_2(int directory, const char *path, int flags)
{
    REAL(__openat_2);
    if (CHANGES(flags) && path_point("__openat_2", path, NULL))
        return -1;
    return real___openat_2(directory, path, flags);
}

int __openat64_2(int directory, const char *path, int flags)
{
    REAL(__openat64_2);
    if (CHANGES(flags) && path_point("__openat64_2", path, NULL))
        return -1;
    return real___openat64_2(directory, path, flags);
}

int creat(const char *path, mode_t mode)
{
    REAL(creat);
    if (path_point("creat", path, NULL))
        return -1;
    return real_creat(path, mode);
}

int creat64(const char *path, mode_t mode)
{
    REAL(creat64);
    if (path_point("creat64", path, NULL))
        return -1;
    return real_creat64(path, mode);
}

int mkstemp(char *template)
{
    REAL(mkstemp);
    if (path_point("mkstemp", template, NULL))
        return -1;
    return real_mkstemp(template);
}

int mkstemp64(char *template)
{
    REAL(mkstemp64);
    if (path_point("mkstemp64", template, NULL))
        return -1;
    return real_mkstemp64(template);
}

/* ---- writing ---- */

ssize_t write(int fd, const void *buffer, size_t count)
{
    REAL(write);
    if (fd_point("write", fd))
        return -1;
    return real_write(fd, buffer, count);
}

ssize_t pwrite(int fd, const void *buffer, size_t count, off_t offset)
{
    REAL(pwrite);
    if (fd_point("pwrite", fd))
        return -1;
    return real_pwrite(fd, buffer, count, offset);
}

ssize_t pwrite64(int fd, const void *buffer, size_t count, off64_t offset)
{
    REAL(pwrite64);
    if (fd_point("pwrite64", fd))
        return -1;
    return real_pwrite64(fd, buffer, count, offset);
}

ssize_t writev(int fd, const struct iovec *vector, int count)
{
    REAL(writev);
    if (fd_point("writev", fd))
        return -1;
    return real_writev(fd, vector, count);
}

ssize_t pwritev(int fd, const struct iovec *vector, int count, off_t offset)
{
    REAL(pwritev);
    if (fd_point("pwritev", fd))
        return -1;
    return real_pwritev(fd, vector, count, offset);
}

ssize_t pwritev64(int fd, const struct iovec *vector, int count, off64_t offset)
{
    REAL(pwritev64);
    if (fd_point("pwritev64", fd))
        return -1;
    return real_pwritev64(fd, vector, count, offset);
}

ssize_t pwritev2(int fd, const struct iovec *vector, int count, off_t offset, int flags)
{
    REAL(pwritev2);
    if (fd_point("pwritev2", fd))
        return -1;
    return real_pwritev2(fd, vector, count, offset, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *vector, int count, off64_t offset, int flags)
{
    REAL(pwritev64v2);
    if (fd_point("pwritev64v2", fd))
        return -1;
    return real_pwritev64v2(fd, vector, count, offset, flags);
}

ssize_t sendfile(int out, int in, off_t *offset, size_t count)
{
    REAL(sendfile);
    if (fd_point("sendfile", out))
        return -1;
    return real_sendfile(out, in, offset, count);
}

ssize_t sendfile64(int out, int in, off64_t *offset, size_t count)
{
    REAL(sendfile64);
    if (fd_point("sendfile64", out))
        return -1;
    return real_sendfile64(out, in, offset, count);
}

ssize_t copy_file_range(int in, off64_t *in_offset, int out, off64_t *out_offset, size_t count, unsigned flags)
{
    REAL(copy_file_range);
    if (fd_point("copy_file_range", out))
        return -1;
    return real_copy_file_range(in, in_offset, out, out_offset, count, flags);
}

/* ---- sizing ---- */

int ftruncate(int fd, off_t length)
{
    REAL(ftruncate);
    if (fd_point("ftruncate", fd))
        return -1;
    return real_ftruncate(fd, length);
}

int ftruncate64(int fd, off64_t length)
{
    REAL(ftruncate64);
    if (fd_point("ftruncate64", fd))
        return -1;
    return real_ftruncate64(fd, length);
}

int truncate(const char *path, off_t length)
{
    REAL(truncate);
    if (path_point("truncate", path, NULL))
        return -1;
    return real_truncate(path, length);
}

int truncate64(const char *path, off64_t length)
{
    REAL(truncate64);
    if (path_point("truncate64", path, NULL))
        return -1;
    return real_truncate64(path, length);
}

int fallocate(int fd, int mode, off_t offset, off_t length)
{
    REAL(fallocate);
    if (fd_point("fallocate", fd))
        return -1;
    return real_fallocate(fd, mode, offset, length);
}

int fallocate64(int fd, int mode, off64_t offset, off64_t length)
{
    REAL(fallocate64);
    if (fd_point("fallocate64", fd))
        return -1;
    return real_fallocate64(fd, mode, offset, length);
}

/* posix_fallocate returns the error number instead of setting errno. */
int posix_fallocate(int fd, off_t offset, off_t length)
{
    REAL(posix_fallocate);
    if (fd_point("posix_fallocate", fd))
        return ENOSPC;
    return real_posix_fallocate(fd, offset, length);
}

int posix_fallocate64(int fd, off64_t offset, off64_t length)
{
    REAL(posix_fallocate64);
    if (fd_point("posix_fallocate64", fd))
        return ENOSPC;
    return real_posix_fallocate64(fd, offset, length);
}

/* ---- flushing ---- */

int fsync(int fd)
{
    REAL(fsync);
    if (fd_point("fsync", fd))
        return -1;
    return real_fsync(fd);
}

int fdatasync(int fd)
{
    REAL(fdatasync);
    if (fd_point("fdatasync", fd))
        return -1;
    return real_fdatasync(fd);
}

int sync_file_range(int fd, off64_t offset, off64_t count, unsigned int flags)
{
    REAL(sync_file_range);
    if (fd_point("sync_file_range", fd))
        return -1;
    return real_sync_file_range(fd, offset, count, flags);
}

/* The file mapped at `address`, from /proc/self/maps ("" when it maps none). */
static const char *describe_mapping(const void *address, char *buffer, size_t size)
{
    char line[600];
    unsigned long start, end;
    FILE *maps = fopen("/proc/self/maps", "re");
    buffer[0] = '\0';
    if (maps == NULL)
        return buffer;
    while (fgets(line, sizeof line, maps) != NULL) {
        char *path = strchr(line, '/');
        if (sscanf(line, "%lx-%lx", &start, &end) != 2 || (unsigned long)address < start ||
            (unsigned long)address >= end || path == NULL)
            continue;
        path[strcspn(path, "\n")] = '\0';
        snprintf(buffer, size, "%s", path);
        break;
    }
    fclose(maps);
    return buffer;
}

int msync(void *address, size_t length, int flags)
{
    char detail[420], mapped[380];
    REAL(msync);
    snprintf(detail, sizeof detail, "%s, %zu bytes", describe_mapping(address, mapped, sizeof mapped), length);
    if (path_point("msync", detail, NULL))
        return -1;
    return real_msync(address, length, flags);
}

/* ---- naming ---- */

int rename(const char *old, const char *new)
{
    REAL(rename);
    if (path_point("rename", old, new))
        return -1;
    return real_rename(old, new);
}

int renameat(int old_directory, const char *old, int new_directory, const char *new)
{
    REAL(renameat);
    if (path_point("renameat", old, new))
        return -1;
    return real_renameat(old_directory, old, new_directory, new);
}

int renameat2(int old_directory, const char *old, int new_directory, const char *new, unsigned int flags)
{
    REAL(renameat2);
    if (path_point("renameat2", old, new))
        return -1;
    return real_renameat2(old_directory, old, new_directory, new, flags);
}

int link(const char *old, const char *new)
{
    REAL(link);
    if (path_point("link", old, new))
        return -1;
    return real_link(old, new);
}

int linkat(int old_directory, const char *old, int new_directory, const char *new, int flags)
{
    REAL(linkat);
    if (path_point("linkat", old, new))
        return -1;
    return real_linkat(old_directory, old, new_directory, new, flags);
}

int symlink(const char *target, const char *path)
{
    REAL(symlink);
    if (path_point("symlink", target, path))
        return -1;
    return real_symlink(target, path);
}

int unlink(const char *path)
{
    REAL(unlink);
    if (path_point("unlink", path, NULL))
        return -1;
    return real_unlink(path);
}

int unlinkat(int directory, const char *path, int flags)
{
    REAL(unlinkat);
    if (path_point("unlinkat", path, NULL))
        return -1;
    return real_unlinkat(directory, path, flags);
}

/* ---- the inode ---- */

int fchmod(int fd, mode_t mode)
{
    REAL(fchmod);
    if (fd_point("fchmod", fd))
        return -1;
    return real_fchmod(fd, mode);
}

int fchown(int fd, uid_t owner, gid_t group)
{
    REAL(fchown);
    if (fd_point("fchown", fd))
        return -1;
    return real_fchown(fd, owner, group);
}
