/* Guest memory workload for the real-guest tests: holds a scheduled amount of touched
 * anonymous memory. argv[1] is "MiB@seconds,MiB@seconds,...": from each time (seconds
 * since start) on, hold that many MiB. Prints "RG-WORK <MiB>" on the console at each
 * change (and "RG-BEGIN <MiB>" when one starts: touching takes seconds under TCG, so
 * "RG-AT <MiB>" every PROGRESS_MIB while it touches: the rise's real shape), then sleeps
 * forever after the last one. Built static: the initramfs has no libc. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1024 * 1024)
#define MAX_CHUNKS 65536
#define PROGRESS_MIB 16

static void *chunks[MAX_CHUNKS];
static long held;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void hold(long mib) {
    if (mib != held) { printf("RG-BEGIN %ld\n", mib); fflush(stdout); } /* when a change starts */
    while (held < mib && held < MAX_CHUNKS) {
        char *p = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { printf("RG-WORK mmap failed at %ld\n", held); break; }
        for (long i = 0; i < CHUNK; i += 4096) p[i] = 1; /* touch every page */
        chunks[held++] = p;
        if (held % PROGRESS_MIB == 0 && held < mib) { printf("RG-AT %ld\n", held); fflush(stdout); }
    }
    while (held > mib) munmap(chunks[--held], CHUNK);
    printf("RG-WORK %ld\n", held);
    fflush(stdout);
}

int main(int argc, char **argv) {
    double start = now_s();
    char *spec = argc > 1 ? strdup(argv[1]) : strdup("");
    for (char *tok = strtok(spec, ","); tok; tok = strtok(NULL, ",")) {
        long mib = 0; double at = 0;
        if (sscanf(tok, "%ld@%lf", &mib, &at) != 2) { printf("RG-WORK bad step %s\n", tok); continue; }
        while (now_s() - start < at) usleep(100000);
        hold(mib);
    }
    for (;;) pause();
}
