/* A slow disk on demand: an LD_PRELOAD shim that holds fsync(2) of one file until the test lets it go.
 *
 * Built by tests/support/faults.py (build_shim) with
 *     gcc -shared -fPIC -O2 -o holdfsync.so holdfsync.c -ldl
 * and run in poplock-reader. An fsync of a file whose path matches HOLD_FSYNC_PATH (a glob), while the file
 * HOLD_FSYNC_GATE exists, creates GATE.held and waits until GATE is removed; then, if GATE.fail exists,
 * it removes that and fails with EIO (once), else it syncs. Any other fsync is the real one.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int (*real_fsync)(int);

static int held_file(int fd)
{
    const char *pattern = getenv("HOLD_FSYNC_PATH");
    char link[64], path[4096];
    ssize_t length;
    if (pattern == NULL || *pattern == '\0')
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    length = readlink(link, path, sizeof path - 1);
    if (length < 0)
        return 0;
    path[length] = '\0';
    return fnmatch(pattern, path, 0) == 0;
}

int fsync(int fd)
{
    const char *gate = getenv("HOLD_FSYNC_GATE");
    char marker[4096], failure[4096];
    if (real_fsync == NULL)
        real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (gate != NULL && held_file(fd) && access(gate, F_OK) == 0) {
        int made;
        snprintf(marker, sizeof marker, "%s.held", gate);
        snprintf(failure, sizeof failure, "%s.fail", gate);
        made = open(marker, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (made >= 0)
            close(made);
        while (access(gate, F_OK) == 0)
            usleep(1000);
        unlink(marker);
        if (unlink(failure) == 0) {
            errno = EIO;
            return -1;
        }
    }
    return real_fsync(fd);
}
