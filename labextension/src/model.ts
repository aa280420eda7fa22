// The remote kernels' status, from the server extension: one long poll for every
// kernel of the server (GET status?since=VERSION answers as soon as something changed).
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

export interface IKernelStatus {
  kernel_id: string;
  kernelspec?: string;
  display_name?: string;
  session_path?: string;
  phase?: string; // starting | queued | running | link-down | ended | failed
  started?: number;
  error?: string;
  transport?: string;
  curve?: boolean;
  choices?: Record<string, unknown>;
  forwards?: Record<string, { url: string; proxy: string }>;
  failover?: { from?: string; why?: string; count?: number };
  host?: { alias?: string; hostname?: string; user?: string; via?: string };
  link?: { state?: string; since?: number; retry_until?: number; reattached?: number };
  slurm?: {
    job_id?: string;
    login?: string;
    partition?: string;
    gpus?: string;
    time?: string;
    state?: string;
    reason?: string;
    expected_start?: string;
    node?: string;
    walltime_ends?: number;
    warn_before_walltime?: number;
  };
}

export interface IOption {
  name: string;
  kind: string; // int | choice | duration | memory
  label: string;
  default: unknown;
  choices: string[];
  min: unknown;
  max: unknown;
}

const API = 'ssh-provisioner/api';

export async function request(path: string, init: RequestInit = {}): Promise<any> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, API, path);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  const body = text ? JSON.parse(text) : {};
  if (!response.ok) {
    // Jupyter Server's error body: {"message": ..., "reason": ...}
    throw new Error(body.message || body.reason || response.statusText);
  }
  return body;
}

export class StatusModel {
  private _kernels = new Map<string, IKernelStatus>();
  private _changed = new Signal<this, void>(this);
  private _version = -1;
  private _stopped = false;

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get kernels(): IKernelStatus[] {
    return [...this._kernels.values()];
  }

  /** The status of a notebook's kernel: by its id, or while its start is pending (no
   * id known yet), by the notebook's path. */
  find(kernelId: string | undefined, path: string | undefined): IKernelStatus | undefined {
    if (kernelId && this._kernels.has(kernelId)) {
      return this._kernels.get(kernelId);
    }
    return this.kernels
      .filter(k => path && k.session_path === path && (k.phase === 'starting' || k.phase === 'queued' || k.phase === 'failed'))
      .sort((a, b) => (b.started ?? 0) - (a.started ?? 0))[0];
  }

  async run(): Promise<void> {
    let failures = 0;
    while (!this._stopped) {
      try {
        const body = await request(`status?since=${this._version}`);
        failures = 0;
        this._version = body.version;
        this._kernels = new Map(body.kernels.map((k: IKernelStatus) => [k.kernel_id, k]));
        this._changed.emit();
      } catch (error) {
        // the server restarting, or the extension not loaded: back off, keep trying
        failures += 1;
        await new Promise(resolve => setTimeout(resolve, Math.min(30000, 1000 * failures)));
      }
    }
  }

  dispose(): void {
    this._stopped = true;
  }
}
