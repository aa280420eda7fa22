// The form a kernelspec's user_options make: one field per option, with its bounds
// (the server checks them again: a value outside them is refused there).
import { Dialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { IOption } from './model';

export class ChoicesForm extends Widget implements Dialog.IBodyWidget<Record<string, string>> {
  private _fields = new Map<string, HTMLInputElement | HTMLSelectElement>();

  constructor(options: IOption[], last: Record<string, string>) {
    super();
    this.addClass('sshp-form');
    for (const option of options) {
      const label = document.createElement('label');
      label.textContent = option.label;
      let field: HTMLInputElement | HTMLSelectElement;
      const value = String(last[option.name] ?? option.default ?? '');
      if (option.kind === 'choice') {
        const select = document.createElement('select');
        if (option.name === 'host' && option.default === null) {
          select.add(new Option('any (the policy picks)', ''));
        }
        for (const choice of option.choices) {
          select.add(new Option(choice, choice));
        }
        field = select;
      } else {
        const input = document.createElement('input');
        // no min/max attributes: JupyterLab would grey out Start without a word; the
        // server's refusal says which bound a value is outside
        input.type = option.kind === 'int' ? 'number' : 'text';
        const bounds = [option.min, option.max].map(b => (b === null ? '' : String(b)));
        input.placeholder = option.kind === 'duration' ? 'HH:MM:SS' : option.kind === 'memory' ? 'e.g. 16G' : '';
        if (bounds[0] || bounds[1]) {
          input.title = `${bounds[0] || '…'} to ${bounds[1] || '…'}`;
        }
        field = input;
      }
      field.name = option.name;
      field.value = value;
      this._fields.set(option.name, field);
      label.appendChild(field);
      if (field instanceof HTMLInputElement && field.title) {
        const hint = document.createElement('span');
        hint.className = 'sshp-bounds';
        hint.textContent = field.title;
        label.appendChild(hint);
      }
      this.node.appendChild(label);
    }
  }

  getValue(): Record<string, string> {
    const chosen: Record<string, string> = {};
    for (const [name, field] of this._fields) {
      if (field.value !== '') {
        chosen[name] = field.value;
      }
    }
    return chosen;
  }
}
