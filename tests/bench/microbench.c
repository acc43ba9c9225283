/* The 1,000-file microbench of docs/benchmarks.md ("C++ build and file
 * microbench"), compiled and run inside the benchmark guest by
 * tests/bench/cxx_build.sh.
 *
 *   microbench DIR [N] [ROUNDS]
 *
 * In DIR/mb (made fresh), per round: create N files of 100 bytes (open,
 * write, close), stat the N files by name, read the N files (open, read,
 * close), then drop the guest's caches (sync; drop_caches=3, as root) and
 * stat and read them again (cold), then remove them (unlink N, rmdir:
 * what `rm -r` does). Prints one line per round and phase:
 *   PHASE SECONDS
 * with PHASE one of create stat read stat_cold read_cold rm.
 * Every figure is wall-clock (CLOCK_MONOTONIC) around the phase's system
 * calls only: no process start, no shell. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path) {
  fprintf(stderr, "microbench: %s %s: %s\n", what, path, strerror(errno));
  exit(1);
}

static void drop_caches(void) {
  sync();
  int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
  if (fd < 0 || write(fd, "3\n", 2) != 2) die("drop caches via", "/proc/sys/vm/drop_caches");
  close(fd);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: microbench DIR [N] [ROUNDS]\n");
    return 2;
  }
  int n = argc > 2 ? atoi(argv[2]) : 1000;
  int rounds = argc > 3 ? atoi(argv[3]) : 1;
  char dir[4096], path[4200], buf[4096];
  snprintf(dir, sizeof dir, "%s/mb", argv[1]);
  memset(buf, 'x', 100);
  buf[99] = '\n';

  for (int r = 0; r < rounds; r++) {
    struct stat st;
    double t;
    if (mkdir(dir, 0755) != 0) die("mkdir", dir);

    t = now();
    for (int i = 0; i < n; i++) {
      snprintf(path, sizeof path, "%s/f%04d.txt", dir, i);
      int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
      if (fd < 0) die("create", path);
      if (write(fd, buf, 100) != 100) die("write", path);
      if (close(fd) != 0) die("close", path);
    }
    printf("create %.6f\n", now() - t);

    for (int cold = 0; cold < 2; cold++) {
      if (cold) drop_caches();
      t = now();
      for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%04d.txt", dir, i);
        if (stat(path, &st) != 0 || st.st_size != 100) die("stat", path);
      }
      printf("stat%s %.6f\n", cold ? "_cold" : "", now() - t);
      if (cold) drop_caches();
      t = now();
      for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%04d.txt", dir, i);
        int fd = open(path, O_RDONLY);
        if (fd < 0) die("open", path);
        if (read(fd, buf, sizeof buf) != 100) die("read", path);
        close(fd);
      }
      printf("read%s %.6f\n", cold ? "_cold" : "", now() - t);
    }

    t = now();
    for (int i = 0; i < n; i++) {
      snprintf(path, sizeof path, "%s/f%04d.txt", dir, i);
      if (unlink(path) != 0) die("unlink", path);
    }
    if (rmdir(dir) != 0) die("rmdir", dir);
    printf("rm %.6f\n", now() - t);
    fflush(stdout);
  }
  return 0;
}
