// What the status bar and the panel say of a remote kernel: plain functions of its
// status, so that both say the same.
import { IKernelStatus } from './model';

export function duration(seconds: number): string {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 90) {
    return `${seconds} s`;
  }
  const minutes = Math.round(seconds / 60);
  if (minutes < 90) {
    return `${minutes} min`;
  }
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function clock(epochSeconds: number): string {
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

/** Slurm's estimate ("2026-12-07T14:20:00") as the user's clock time. */
function expected(start: string | undefined): string {
  if (!start) {
    return '';
  }
  const at = Date.parse(start);
  return isNaN(at) ? start : `, expected ${clock(at / 1000)}`;
}

export function where(status: IKernelStatus): string {
  const host = status.host;
  if (status.slurm?.node) {
    return `${status.slurm.node} (job ${status.slurm.job_id} via ${host?.alias ?? status.slurm.login})`;
  }
  if (!host?.alias) {
    return status.slurm?.login ?? status.display_name ?? 'remote host';
  }
  return host.hostname && host.hostname !== host.alias ? `${host.alias} (${host.hostname})` : host.alias;
}

export function walltimeLeft(status: IKernelStatus, now: number): number | undefined {
  const ends = status.slurm?.walltime_ends;
  return ends === undefined ? undefined : ends - now;
}

/** One line for the status bar, and whether it is a warning. */
export function summary(status: IKernelStatus, now: number): { text: string; warn: boolean } {
  const slurm = status.slurm;
  switch (status.phase) {
    case 'queued': {
      // Slurm says "None" until its scheduler has looked at the job
      const reason = slurm?.reason && slurm.reason !== 'None' ? slurm.reason : '';
      const where = slurm?.partition || slurm?.login || 'Slurm';
      const why = reason || slurm?.state || 'submitted';
      return { text: `queued on ${where}: ${why}${expected(slurm?.expected_start)}`, warn: false };
    }
    case 'starting':
      return { text: `starting on ${where(status)}…`, warn: false };
    case 'failed':
      return { text: `start failed: ${(status.error ?? '').split('\n')[0]}`, warn: true };
    case 'link-down': {
      const down = now - (status.link?.since ?? now);
      return { text: `${where(status)}: link down ${duration(down)}, reconnecting`, warn: true };
    }
    case 'ended':
      return { text: `${where(status)}: ${status.link?.state === 'given-up' ? 'unreachable, given up' : 'ended'}`, warn: true };
  }
  let text = where(status);
  let warn = false;
  const reattached = status.link?.reattached;
  if (reattached && now - reattached < 120) {
    text += ` · reattached ${clock(reattached)}`;
  }
  const left = walltimeLeft(status, now);
  if (left !== undefined) {
    text += ` · ${duration(left)} left`;
    warn = left <= (slurm?.warn_before_walltime ?? 300);
  }
  return { text, warn };
}

/** The panel's rows: label, value, and a link where the value is one. */
export function details(status: IKernelStatus, now: number): [string, string, string?][] {
  const rows: [string, string, string?][] = [];
  const add = (label: string, value: unknown, href?: string) => {
    if (value !== undefined && value !== null && value !== '') {
      rows.push([label, String(value), href]);
    }
  };
  add('Kernel', `${status.display_name ?? status.kernelspec ?? ''} (${status.kernel_id.slice(0, 8)})`);
  add('State', summary(status, now).text);
  add('Host', status.host?.alias);
  add("Host's name", status.host?.hostname);
  add('Login user', status.host?.user);
  add('Reached', status.host?.via);
  add('Transport', status.transport);
  if (status.curve !== undefined) {
    add('CurveZMQ', status.curve ? 'on' : 'off');
  }
  const link = status.link;
  if (link?.state) {
    const since = link.since ? ` since ${clock(link.since)}` : '';
    add('Link', `${link.state}${since}`);
  }
  if (link?.reattached) {
    add('Reattached', clock(link.reattached));
  }
  const slurm = status.slurm;
  if (slurm) {
    add('Slurm job', slurm.job_id);
    add('Partition', slurm.partition);
    add('Node', slurm.node);
    add('GPUs', slurm.gpus);
    add('Job state', slurm.reason && slurm.reason !== 'None' ? `${slurm.state} (${slurm.reason})` : slurm.state);
    add('Expected start', slurm.expected_start);
    const left = walltimeLeft(status, now);
    if (left !== undefined) {
      add('Walltime left', duration(left));
    }
  }
  for (const [name, value] of Object.entries(status.choices ?? {})) {
    add(`Chosen ${name}`, value);
  }
  for (const [remote, links] of Object.entries(status.forwards ?? {})) {
    const href = links.proxy || links.url; // through Jupyter where it can, else direct
    add(`Port ${remote}`, href, href);
  }
  if (status.failover?.from) {
    add('Failed over from', `${status.failover.from}: ${status.failover.why ?? ''}`);
  }
  add('Error', status.error);
  return rows;
}
