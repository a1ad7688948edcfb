/* LD_PRELOAD shim for the receive benchmark: makes DCMTK storescp durable the way the node is.
 *
 * Every regular file closed after being opened for writing is fsynced, then its folder, before the close
 * returns. storescp closes an object's file before it sends the C-STORE response, so with this preloaded
 * it answers Success only once the object and its name are on disk (it still keeps no index).
 * Build: cc -shared -fPIC -O2 -o fsync_on_close.so fsync_on_close.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int (*real_close)(int);
static int (*real_fclose)(FILE *);

static void flush_fd(int fd) {
    struct stat st;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (flags & O_ACCMODE) == O_RDONLY || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    fsync(fd);
    if (n <= 0)
        return;
    path[n] = '\0';
    int dir = open(dirname(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir >= 0) {
        fsync(dir);
        if (!real_close)
            real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
        real_close(dir);
    }
}

int close(int fd) {
    if (!real_close)
        real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    flush_fd(fd);
    return real_close(fd);
}

int fclose(FILE *fp) {
    if (!real_fclose)
        real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (fp && fflush(fp) == 0)
        flush_fd(fileno(fp));
    return real_fclose(fp);
}
