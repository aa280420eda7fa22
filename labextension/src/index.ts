// ssh-provisioner's JupyterLab extension: a status bar item and a panel that say where
// the notebook's remote kernel runs and what it is doing (also while its start is
// still pending), and a form for the resources a kernelspec lets its user choose.
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { details, summary } from './describe';
import { ChoicesForm } from './form';
import { IKernelStatus, IOption, request, StatusModel } from './model';

const PANEL_ID = 'ssh-provisioner-panel';

/** The notebook in front, and its kernel's status if the kernel is ours. */
function current(tracker: INotebookTracker, model: StatusModel): IKernelStatus | undefined {
  const panel: NotebookPanel | null = tracker.currentWidget;
  if (!panel) {
    return undefined;
  }
  const context = panel.sessionContext;
  return model.find(context.session?.kernel?.id, context.path);
}

class StatusItem extends Widget {
  constructor() {
    super();
    this.addClass('sshp-status');
    this.node.title = 'ssh-provisioner: where this kernel runs (click for details)';
  }

  show_(status: IKernelStatus | undefined, now: number): void {
    this.setHidden(!status);
    if (status) {
      const { text, warn } = summary(status, now);
      this.node.textContent = `⇄ ${text}`;
      this.toggleClass('sshp-warn', warn);
      this.node.dataset.phase = status.phase ?? '';
    }
  }
}

class StatusPanel extends Widget {
  constructor() {
    super();
    this.id = PANEL_ID;
    this.addClass('sshp-panel');
    this.title.caption = 'Remote kernel (ssh-provisioner)';
    this.title.label = 'Remote kernel';
  }

  show_(status: IKernelStatus | undefined, now: number): void {
    const node = this.node;
    node.replaceChildren();
    const heading = document.createElement('h3');
    heading.textContent = 'Remote kernel';
    node.appendChild(heading);
    if (!status) {
      const none = document.createElement('p');
      none.textContent = 'The notebook in front has no ssh-provisioner kernel.';
      node.appendChild(none);
      return;
    }
    const table = document.createElement('table');
    for (const [label, value, href] of details(status, now)) {
      const row = table.insertRow();
      row.insertCell().textContent = label;
      const cell = row.insertCell();
      if (href) {
        const link = document.createElement('a');
        link.href = href;
        link.target = '_blank';
        link.textContent = value;
        cell.appendChild(link);
      } else {
        cell.textContent = value;
      }
      if (label === 'Error') {
        cell.classList.add('sshp-error');
      }
    }
    node.appendChild(table);
  }
}

async function startWithChoices(
  app: JupyterFrontEnd,
  name: string,
  displayName: string,
  options: IOption[],
  cwd: string
): Promise<void> {
  const remembered = `ssh-provisioner:choices:${name}`;
  const form = new ChoicesForm(options, JSON.parse(localStorage.getItem(remembered) ?? '{}'));
  const result = await showDialog({
    title: `Start ${displayName}`,
    body: form,
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Start' })]
  });
  if (!result.button.accept) {
    return;
  }
  const chosen = form.getValue();
  const notebook = await app.commands.execute('docmanager:new-untitled', { path: cwd, type: 'notebook' });
  let kernel;
  try {
    kernel = await request('kernels', {
      method: 'POST',
      body: JSON.stringify({ name, path: notebook.path, options: chosen })
    });
  } catch (error) {
    await app.serviceManager.contents.delete(notebook.path);
    await showErrorMessage(`Cannot start ${displayName}`, (error as Error).message);
    return;
  }
  localStorage.setItem(remembered, JSON.stringify(chosen)); // the last choice that started
  await app.commands.execute('docmanager:open', {
    path: notebook.path,
    factory: 'Notebook',
    kernel: { id: kernel.id, name }
  });
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'ssh-provisioner:plugin',
  description: "Where a remote kernel runs, what it waits for, and what it may use.",
  autoStart: true,
  requires: [INotebookTracker, ILabShell],
  optional: [IStatusBar, ILauncher],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    shell: ILabShell,
    statusBar: IStatusBar | null,
    launcher: ILauncher | null
  ) => {
    const model = new StatusModel();
    const item = new StatusItem();
    const panel = new StatusPanel();
    shell.add(panel, 'right', { rank: 900 });
    const refresh = () => {
      const status = current(tracker, model);
      const now = Date.now() / 1000;
      item.show_(status, now);
      panel.show_(status, now);
    };
    item.node.addEventListener('click', () => shell.activateById(PANEL_ID));
    if (statusBar) {
      statusBar.registerStatusItem('ssh-provisioner:status', { item, align: 'left', rank: 5 });
    }
    model.changed.connect(refresh);
    tracker.currentChanged.connect(refresh);
    tracker.widgetAdded.connect((_, notebook) => {
      notebook.sessionContext.kernelChanged.connect(refresh);
      notebook.sessionContext.statusChanged.connect(refresh);
    });
    setInterval(refresh, 1000); // the clocks: link down for N s, walltime left
    void model.run();

    if (launcher) {
      const command = 'ssh-provisioner:start-with-choices';
      app.commands.addCommand(command, {
        label: args => `${args.displayName} …`,
        caption: args => `Start ${args.displayName}, choosing its resources`,
        execute: args =>
          startWithChoices(
            app,
            String(args.name),
            String(args.displayName),
            args.options as unknown as IOption[],
            String(args.cwd ?? '')
          )
      });
      void request('kernelspecs').then(body => {
        for (const [name, spec] of Object.entries<any>(body.kernelspecs)) {
          launcher.add({
            command,
            args: { name, displayName: spec.display_name, options: spec.options },
            category: 'Notebook',
            rank: 0
          });
        }
      });
    }
  }
};

export default plugin;
