/*
 * NVML TEST DOUBLE — not NVIDIA's library. A stand-in `libnvidia-ml.so.1` for machines without
 * an NVIDIA GPU, so the CUDA backend's GPU path (detection, allocation, VRAM enforcement,
 * telemetry) can be tested for real against the NVML C API it calls. It follows that API (names,
 * signatures, struct layouts, return codes of nvml.h, API v12) for the functions RhizOS uses and
 * nothing else.
 *
 * Its "hardware" lives in the directory named by RHIZOS_NVML_DOUBLE_DIR, or else the directory
 * this library file is in (so each test gets its own GPUs by using its own copy):
 *   gpus          one line per GPU: name|uuid|total_mib|major.minor
 *   procs/<pid>   "<uuid> <bytes>" lines: VRAM that process holds on that GPU (a test workload
 *                 writes its own file, the way a CUDA allocation would show up in the driver).
 *                 Only live processes are reported.
 * Without the `gpus` file, nvmlInit_v2 fails with NVML_ERROR_DRIVER_NOT_LOADED, like a machine
 * without the driver.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

#define MAX_GPUS 16
#define MAX_PROCS 256

struct gpu {
    char name[96];
    char uuid[96];
    unsigned long long total_bytes;
    int major, minor;
};

static struct gpu gpus[MAX_GPUS];
static unsigned int gpu_count;
static int initialised;
static char dir[4096];

static int load(void) {
    const char *root = getenv("RHIZOS_NVML_DOUBLE_DIR");
    if (root) {
        snprintf(dir, sizeof dir, "%s", root);
    } else {
        Dl_info info;
        if (!dladdr((void *)load, &info) || !info.dli_fname) return 0;
        snprintf(dir, sizeof dir, "%s", info.dli_fname);
        char *slash = strrchr(dir, '/');
        if (!slash) return 0;
        *slash = 0;
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/gpus", dir);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char line[512];
    gpu_count = 0;
    while (gpu_count < MAX_GPUS && fgets(line, sizeof line, f)) {
        struct gpu *g = &gpus[gpu_count];
        unsigned long long mib;
        if (sscanf(line, "%95[^|]|%95[^|]|%llu|%d.%d", g->name, g->uuid, &mib, &g->major, &g->minor) == 5) {
            g->total_bytes = mib << 20;
            gpu_count++;
        }
    }
    fclose(f);
    return 1;
}

static struct gpu *device(nvmlDevice_t d) {
    size_t i = (size_t)d;
    if (!initialised || i == 0 || i > gpu_count) return NULL;
    return &gpus[i - 1];
}

/* Processes holding VRAM on `g`, from procs/<pid>; returns how many (up to max). */
static unsigned int processes(struct gpu *g, nvmlProcessInfo_t *out, unsigned int max, unsigned long long *sum) {
    char path[4200];
    snprintf(path, sizeof path, "%s/procs", dir);
    DIR *d = opendir(path);
    unsigned int n = 0;
    *sum = 0;
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        int pid = atoi(e->d_name);
        if (pid <= 0 || kill(pid, 0) != 0) continue;
        char file[4600];
        snprintf(file, sizeof file, "%s/%s", path, e->d_name);
        FILE *f = fopen(file, "r");
        if (!f) continue;
        char uuid[96];
        unsigned long long bytes;
        while (fscanf(f, "%95s %llu", uuid, &bytes) == 2) {
            if (strcmp(uuid, g->uuid) != 0) continue;
            *sum += bytes;
            if (n < max && out) {
                out[n].pid = (unsigned int)pid;
                out[n].usedGpuMemory = bytes;
                out[n].gpuInstanceId = 0xFFFFFFFFu;
                out[n].computeInstanceId = 0xFFFFFFFFu;
            }
            n++;
        }
        fclose(f);
    }
    closedir(d);
    return n;
}

static nvmlReturn_t copy(char *to, unsigned int length, const char *from) {
    if (!to) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(from) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(to, from);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    if (!load()) return NVML_ERROR_DRIVER_NOT_LOADED;
    initialised = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return nvmlInit_v2();
}

nvmlReturn_t nvmlShutdown(void) {
    initialised = 0;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    return copy(version, length, "550.54.15");
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    *version = 12040;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) {
    return nvmlSystemGetCudaDriverVersion(version);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = gpu_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *out) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (!out || index >= gpu_count) return NVML_ERROR_INVALID_ARGUMENT;
    *out = (nvmlDevice_t)(size_t)(index + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *out) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (!uuid || !out) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < gpu_count; i++) {
        if (strcmp(gpus[i].uuid, uuid) == 0) {
            *out = (nvmlDevice_t)(size_t)(i + 1);
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *index) {
    if (!device(d) || !index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = (unsigned int)((size_t)d - 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    struct gpu *g = device(d);
    if (!g) return NVML_ERROR_INVALID_ARGUMENT;
    return copy(name, length, g->name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    struct gpu *g = device(d);
    if (!g) return NVML_ERROR_INVALID_ARGUMENT;
    return copy(uuid, length, g->uuid);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *memory) {
    struct gpu *g = device(d);
    if (!g || !memory) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used;
    processes(g, NULL, 0, &used);
    memory->total = g->total_bytes;
    memory->reserved = 0;
    memory->used = used;
    memory->free = used > g->total_bytes ? 0 : g->total_bytes - used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t d, int *major, int *minor) {
    struct gpu *g = device(d);
    if (!g || !major || !minor) return NVML_ERROR_INVALID_ARGUMENT;
    *major = g->major;
    *minor = g->minor;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *utilization) {
    struct gpu *g = device(d);
    if (!g || !utilization) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used;
    unsigned int n = processes(g, NULL, 0, &used);
    utilization->gpu = n > 0 ? 87 : 0;
    utilization->memory = (unsigned int)(used * 100 / (g->total_bytes ? g->total_bytes : 1));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *temp) {
    if (!device(d) || !temp || sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = 41;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *milliwatts) {
    if (!device(d) || !milliwatts) return NVML_ERROR_INVALID_ARGUMENT;
    *milliwatts = 68500;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    struct gpu *g = device(d);
    if (!g || !count) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used;
    nvmlProcessInfo_t found[MAX_PROCS];
    unsigned int n = processes(g, found, MAX_PROCS, &used);
    if (n > MAX_PROCS) n = MAX_PROCS;
    if (!infos || *count < n) {
        *count = n;
        return n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(infos, found, n * sizeof *infos);
    *count = n;
    return NVML_SUCCESS;
}
